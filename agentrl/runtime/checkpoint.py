"""Training checkpoints: the model in HF layout (loads in transformers and SGLang) plus the trainer
state needed to continue exactly: optimizer, LR schedule, EMA, RNG states, step / policy version,
and the controller's data position.

Layout: runs/<name>/checkpoints/step_<N>/{config.json, model.safetensors, tokenizer files,
trainer_state.pt}; runs/<name>/checkpoints/LATEST names the newest complete one (written last, by an
atomic rename, so a kill -9 at any moment leaves either the old or the new checkpoint usable).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(path: Path, learner, model_dir: str, extra: dict) -> str:
    from transformers import AutoTokenizer

    from agentrl.model import save_pretrained

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(learner.model, tmp, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    torch.save({
        "optimizer": learner.opt.state_dict(), "scheduler": learner.sched.state_dict(), "version": learner.version,
        "ema": learner.ema, "learner_rng": learner.gen.get_state(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "extra": extra,
    }, tmp / "trainer_state.pt")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    marker = path.parent / "LATEST"
    tmp_marker = path.parent / "LATEST.tmp"
    tmp_marker.write_text(path.name)
    tmp_marker.replace(marker)
    return str(path)


def load_checkpoint(path: Path, learner) -> dict:
    """Restore a learner in place; returns the controller's `extra` dict."""
    from agentrl.model.checkpoint import fuse_experts, read_state_dict

    state = fuse_experts(read_state_dict(path))
    if learner.model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    learner.model.load_state_dict(state)
    ts = torch.load(path / "trainer_state.pt", weights_only=False)
    learner.opt.load_state_dict(ts["optimizer"])
    learner.sched.load_state_dict(ts["scheduler"])
    learner.version = ts["version"]
    learner.ema = ts["ema"]
    learner.gen.set_state(ts["learner_rng"])
    torch.set_rng_state(ts["rng"]["torch"])
    np.random.set_state(ts["rng"]["numpy"])
    random.setstate(ts["rng"]["python"])
    return ts["extra"]


def latest_checkpoint(run_dir: Path) -> Path | None:
    marker = Path(run_dir) / "checkpoints" / "LATEST"
    if not marker.exists():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None
