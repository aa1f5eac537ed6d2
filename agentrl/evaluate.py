"""`agentrl eval RECIPE`: run a policy on the recipe's held-out tasks and summarise.

Owns: evaluation episodes and their summary. Policies: `model` (the embedded engine on the run's
latest checkpoint, or any SGLang-compatible server via `--base-url`), `gold` (the env's scripted
demonstration: validates the harness, must score 100% where the env can script one) and `noop`
(answers nothing: must score 0%). Writes per-episode records and a summary under
runs/<name>/eval/.
Does not own: training or environments.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agentrl.engine.types import SamplingParams
from agentrl.env import make
from agentrl.recipe import Recipe, run_dir
from agentrl.rollout import run_episode
from agentrl.runtime.checkpoint import latest_checkpoint
from agentrl.sft import ScriptedPolicy


def model_for_eval(recipe: Recipe) -> str:
    """The newest checkpoint of the run, else the warm-up / init model, else the recipe's path."""
    run = run_dir(recipe)
    ckpt = latest_checkpoint(run)
    for cand in (ckpt, run / "warm", run / "init", recipe.model.path):
        if cand and (Path(cand) / "config.json").exists():
            return str(cand)
    raise FileNotFoundError(f"no model to evaluate: train first, or set model.path ({run})")


async def _episodes(recipe: Recipe, policy: str, engine, tok, layout, progress: bool) -> list:
    ev = recipe.eval
    lo, hi = recipe.env.eval_seeds
    seeds = list(range(lo, min(hi, lo + ev.episodes)))
    sampling = SamplingParams(temperature=ev.temperature, max_new_tokens=recipe.rollout.max_new_tokens)
    sem = asyncio.Semaphore(recipe.rollout.concurrency)
    bar = tqdm(total=len(seeds) * ev.samples, desc=f"eval ({policy})", disable=not progress)

    async def one(seed: int, k: int):
        env = make(recipe.env.id, **recipe.env.kwargs)
        pol = engine
        if policy in ("gold", "noop"):
            probe = make(recipe.env.id, **recipe.env.kwargs)
            probe.reset(seed=seed)
            pol = ScriptedPolicy(probe.demonstration(probe.current_task) if policy == "gold" else [""], tok)
        async with sem:
            traj = await run_episode(pol, env, tok, sampling, seed=seed, layout=layout if policy == "model" else None,
                                     max_total_tokens=recipe.rollout.max_total_tokens, group_id=str(seed))
        bar.update(1)
        return seed, k, traj

    out = await asyncio.gather(*(one(s, k) for s in seeds for k in range(ev.samples)))
    bar.close()
    return out


def evaluate(recipe: Recipe, policy: str | None = None, base_url: str | None = None, model_dir: str | None = None,
             progress: bool = True) -> dict:
    from transformers import AutoTokenizer

    if recipe.eval is None:
        raise ValueError("the recipe has no `eval:` section")
    policy = policy or recipe.eval.policy
    base_url = base_url or recipe.eval.base_url
    model_dir = model_dir or model_for_eval(recipe)
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine, layout = None, None
    if policy == "model":
        if base_url:
            from agentrl.engine.client import EngineClient

            engine = EngineClient(base_url)
        else:
            from agentrl.engine.engine import Engine

            engine = Engine.from_pretrained(model_dir, dtype=recipe.engine.dtype).start()
            layout = engine.layout
    try:
        results = asyncio.run(_episodes(recipe, policy, engine, tok, layout, progress))
    finally:
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()
    out = run_dir(recipe) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    by_seed: dict[int, list[float]] = {}
    with (out / f"episodes_{policy}.jsonl").open("w") as f:
        for seed, k, t in results:
            by_seed.setdefault(seed, []).append(t.reward)
            f.write(json.dumps({"seed": seed, "sample": k, "reward": t.reward, "status": t.status, "turns": t.turns,
                                "tokens": len(t), "generated_tokens": t.num_generated,
                                "text": tok.decode(t.tokens[t.prompt_len:].tolist())}) + "\n")
    rewards = [t.reward for _, _, t in results]
    summary = {
        "policy": policy, "model": model_dir if policy == "model" else None, "episodes": len(results),
        "reward_mean": float(np.mean(rewards)),
        f"pass@{recipe.eval.samples}": float(np.mean([max(v) > 0 for v in by_seed.values()])),
        "turns_mean": float(np.mean([t.turns for _, _, t in results])),
        "generated_tokens_mean": float(np.mean([t.num_generated for _, _, t in results])),
        "status": {s: sum(t.status == s for _, _, t in results) for s in ("ok", "truncated", "env_error", "engine_error")},
    }
    (out / f"summary_{policy}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
