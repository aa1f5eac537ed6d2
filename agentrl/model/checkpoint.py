"""Checkpoints in the Hugging Face layout: `config.json` + safetensors + tokenizer files.

Owns: writing our model so that `transformers.AutoModelForCausalLM.from_pretrained(dir)` and
SGLang load it, and reading checkpoints written by transformers (or found in the wild) back into
`MoEForCausalLM`.
Does not own: optimizer / RNG / step state (the runtime's checkpoints wrap this one).

On disk, experts use the classic per-expert keys that SGLang and the Hub use:
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`. In memory (ours and transformers
5.x) they are fused: `experts.gate_up_proj [E, 2I, H]` = cat(gate_e, up_e) along dim 1, and
`experts.down_proj [E, H, I]`. Reading accepts either form; sharded checkpoints
(`model.safetensors.index.json`) are read too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from agentrl.model.config import MoEConfig
from agentrl.model.modeling import MoEForCausalLM

_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused in-memory expert tensors -> per-expert on-disk keys (other keys unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = _FUSED.match(key)
        if not m:
            out[key] = t
            continue
        prefix, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous()
            else:
                gate, up = t[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
    return out


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert on-disk keys -> fused in-memory tensors (other keys, and already fused ones, unchanged)."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key, t in state.items():
        m = _PER_EXPERT.match(key)
        if not m:
            out[key] = t
            continue
        prefix, e, kind = m.groups()
        groups.setdefault(prefix, {}).setdefault(kind, {})[int(e)] = t
    for prefix, kinds in groups.items():
        n = {kind: len(v) for kind, v in kinds.items()}
        if set(kinds) != {"gate_proj", "up_proj", "down_proj"} or len(set(n.values())) != 1:
            raise ValueError(f"incomplete experts under {prefix}: {n}")
        num = n["down_proj"]
        for kind in kinds:
            if sorted(kinds[kind]) != list(range(num)):
                raise ValueError(f"{prefix}: expert indices for {kind} are not 0..{num - 1}")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([kinds["gate_proj"][e], kinds["up_proj"][e]], dim=0) for e in range(num)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([kinds["down_proj"][e] for e in range(num)])
    return out


def save_pretrained(
    model: MoEForCausalLM, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write config.json, generation_config.json, model.safetensors (and tokenizer files if given).
    `state` (fused-expert keys, as `model.state_dict()`) replaces the model's own weights: a snapshot
    taken earlier, or EMA weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().cpu() for k, v in (model.state_dict() if state is None else state).items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = split_experts(state)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v)
                 for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def read_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, keys as on disk."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(d.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {d}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(d / f)))
    return state


def load_config(model_dir: str | Path) -> MoEConfig:
    return MoEConfig.from_hf_dict(json.loads((Path(model_dir) / "config.json").read_text()))


def load_pretrained(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> MoEForCausalLM:
    """Build `MoEForCausalLM` from a HF-layout checkpoint (ours or transformers'); strict key check."""
    cfg = load_config(model_dir)
    model = MoEForCausalLM(cfg)
    state = fuse_experts(read_state_dict(model_dir))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {model_dir} does not match its config: missing={missing}, unexpected={unexpected}")
    return model.to(dtype)


def init_model(preset_name: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
               **overrides) -> Path:
    """`agentrl init-model`: a randomly initialised preset, with agentrl's local tokenizer beside it."""
    from agentrl.model.config import preset
    from agentrl.model.tokenizer import build_tokenizer

    cfg = preset(preset_name, **overrides)
    tok = build_tokenizer(cfg.vocab_size)
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model vocab_size is {cfg.vocab_size}")
    cfg = cfg.replace(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = MoEForCausalLM(cfg).init_weights(seed)
    return save_pretrained(model, out_dir, tokenizer=tok, dtype=dtype)
