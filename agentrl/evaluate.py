"""`agentrl eval RECIPE`: run a policy on the recipe's held-out tasks and summarise.

Owns: which evaluation episodes run, the policies that play them, and what is written. Policies:
  * ``model`` -- the embedded engine on the run's latest checkpoint; or, with ``--base-url``, a server:
    ``--api sglang`` (default; SGLang's native ``/generate``: `agentrl serve`, SGLang) plays token-level
    episodes exactly as training does, ``--api openai`` plays message-level episodes against any
    OpenAI-compatible ``/v1/chat/completions`` endpoint with native tool calls (agentrl.chat).
  * ``gold`` -- the env's scripted demonstration (validates the harness: must score 100% where the
    env can script one); ``noop`` -- answers nothing at once (must score 0%).
Tasks: an env with a finite task set (``num_tasks()``: SWE instances, question sets) is evaluated on
its first ``eval.episodes`` tasks, each once per sample; a procedural env on seeds from
``env.eval_seeds``.
Outputs under runs/<name>/eval/: ``episodes_<policy>.jsonl`` (one record per episode: task, sample,
reward, status, turns, tokens, the env's ``episode_metrics()`` and the message history),
``<policy>/<task>_<sample>/`` with the env's ``episode_artifacts()`` (patches, test logs), and
``summary_<policy>.json``: reward mean, pass@k over the samples, turns, tokens, statuses and the mean
of every episode metric (e.g. resolved rate, EM, F1, searches).
Does not own: training, environments, the engines.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from agentrl.engine.types import SamplingParams
from agentrl.env import make
from agentrl.recipe import Recipe, run_dir
from agentrl.rollout import run_episode
from agentrl.runtime.checkpoint import latest_checkpoint
from agentrl.sft import ScriptedPolicy

POLICIES = ("model", "gold", "noop")
APIS = ("sglang", "openai")


@dataclass
class EvalJob:
    """One episode to play: `task` names it in outputs; `seed` and `options` go to env.reset."""

    task: str
    sample: int
    seed: int
    options: dict[str, Any] | None = None


@dataclass
class EvalRecord:
    """One played episode (token-level or message-level alike)."""

    task: str
    sample: int
    reward: float
    status: str
    turns: int
    prompt_tokens: int
    generated_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    error: str | None = None


def model_for_eval(recipe: Recipe) -> str:
    """The newest checkpoint of the run, else the warm-up / init model, else the recipe's path."""
    run = run_dir(recipe)
    ckpt = latest_checkpoint(run)
    for cand in (ckpt, run / "warm", run / "init", recipe.model.path):
        if cand and (Path(cand) / "config.json").exists():
            return str(cand)
    raise FileNotFoundError(f"no model to evaluate: train first, or set model.path ({run})")


def eval_jobs(recipe: Recipe) -> list[EvalJob]:
    """The episodes an evaluation plays: tasks of a finite set by index, else seeds."""
    ev, lo = recipe.eval, recipe.env.eval_seeds[0]
    probe = make(recipe.env.id, **recipe.env.kwargs)
    try:
        n = probe.num_tasks()
    finally:
        probe.close()
    if n is not None:
        return [EvalJob(f"task{i}", k, lo + i, {"task_index": i}) for i in range(min(n, ev.episodes))
                for k in range(ev.samples)]
    hi = recipe.env.eval_seeds[1]
    return [EvalJob(f"seed{s}", k, s) for s in range(lo, min(hi, lo + ev.episodes)) for k in range(ev.samples)]


def _finish(env, job: EvalJob, **kw) -> EvalRecord:
    """Collect the env's own view of the finished episode; an env whose hooks fail loses only them."""
    metrics, artifacts, err = {}, {}, kw.pop("error", None)
    try:
        metrics = {k: float(v) for k, v in env.episode_metrics().items()}
        artifacts = {k: str(v) for k, v in env.episode_artifacts().items()}
    except Exception as e:  # noqa: BLE001
        err = (err or "") + f" episode_metrics/artifacts failed: {type(e).__name__}: {e}"
    rec = EvalRecord(job.task, job.sample, metrics=metrics, artifacts=artifacts,
                     history=list(getattr(env, "history", [])), error=err, **kw)
    env.close()
    return rec


async def _play(recipe: Recipe, policy: str, api: str, engine, tok, layout, jobs: list[EvalJob],
                progress: bool) -> list[EvalRecord]:
    from agentrl.chat import run_chat_episode

    ev = recipe.eval
    sampling = SamplingParams(temperature=ev.temperature, max_new_tokens=recipe.rollout.max_new_tokens)
    sem = asyncio.Semaphore(recipe.rollout.concurrency)
    quiet = {} if progress else {"disable": True}  # (passing disable=False would override TQDM_DISABLE)
    bar = tqdm(total=len(jobs), desc=f"eval ({policy})", **quiet)

    async def one(job: EvalJob) -> EvalRecord:
        env = make(recipe.env.id, **recipe.env.kwargs)
        async with sem:
            if policy == "model" and api == "openai":
                ep = await run_chat_episode(engine, env, sampling, seed=job.seed, options=job.options)
                rec = _finish(env, job, reward=ep.reward, status=ep.status, turns=ep.turns,
                              prompt_tokens=ep.prompt_tokens, generated_tokens=ep.completion_tokens,
                              error=ep.info.get("error"))
            else:
                pol = engine
                if policy != "model":
                    probe = make(recipe.env.id, **recipe.env.kwargs)
                    probe.reset(seed=job.seed, options=job.options)
                    pol = ScriptedPolicy(probe.demonstration(probe.current_task) if policy == "gold" else [""], tok)
                    probe.close()
                t = await run_episode(pol, env, tok, sampling, seed=job.seed, options=job.options,
                                      layout=layout if policy == "model" else None,
                                      max_total_tokens=recipe.rollout.max_total_tokens, group_id=job.task)
                rec = _finish(env, job, reward=t.reward, status=t.status, turns=t.turns, prompt_tokens=t.prompt_len,
                              generated_tokens=t.num_generated, error=t.info.get("error"))
        bar.update(1)
        return rec

    try:
        return list(await asyncio.gather(*(one(j) for j in jobs)))
    finally:
        bar.close()
        if hasattr(engine, "close"):
            await engine.close()


def summarize(records: list[EvalRecord], samples: int, policy: str, model: str | None) -> dict:
    """Reward mean, pass@k (a task counts if any of its samples earned reward > 0), means of turns,
    tokens and every episode metric, and status counts."""
    by_task: dict[str, list[float]] = {}
    for r in records:
        by_task.setdefault(r.task, []).append(r.reward)
    keys = sorted({k for r in records for k in r.metrics})
    out = {
        "policy": policy, "model": model, "tasks": len(by_task), "episodes": len(records),
        "reward_mean": float(np.mean([r.reward for r in records])) if records else 0.0,
        f"pass@{samples}": float(np.mean([max(v) > 0 for v in by_task.values()])) if by_task else 0.0,
        "turns_mean": float(np.mean([r.turns for r in records])) if records else 0.0,
        "generated_tokens_mean": float(np.mean([r.generated_tokens for r in records])) if records else 0.0,
        "prompt_tokens_mean": float(np.mean([r.prompt_tokens for r in records])) if records else 0.0,
        "status": {s: sum(r.status == s for r in records) for s in ("ok", "truncated", "env_error", "engine_error")},
    }
    for k in keys:
        vals = [r.metrics[k] for r in records if k in r.metrics]
        out[f"{k}_mean"] = float(np.mean(vals))
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:120] or "_"


def write_outputs(out: Path, policy: str, records: list[EvalRecord], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"episodes_{policy}.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps({"task": r.task, "sample": r.sample, "reward": r.reward, "status": r.status,
                                "turns": r.turns, "prompt_tokens": r.prompt_tokens,
                                "generated_tokens": r.generated_tokens, "metrics": r.metrics, "error": r.error,
                                "artifacts": sorted(r.artifacts), "history": r.history}, ensure_ascii=False) + "\n")
            if r.artifacts:
                d = out / policy / f"{_safe(r.task)}_{r.sample}"
                d.mkdir(parents=True, exist_ok=True)
                for name, text in r.artifacts.items():
                    (d / _safe(name)).write_text(text)
    (out / f"summary_{policy}.json").write_text(json.dumps(summary, indent=2) + "\n")


def evaluate(recipe: Recipe, policy: str | None = None, base_url: str | None = None, model_dir: str | None = None,
             api: str | None = None, progress: bool = True) -> dict:
    """Play the recipe's evaluation and write its outputs; returns the summary."""
    from transformers import AutoTokenizer

    if recipe.eval is None:
        raise ValueError("the recipe has no `eval:` section")
    ev = recipe.eval
    policy, api, base_url = policy or ev.policy, api or ev.api, base_url or ev.base_url
    if policy not in POLICIES or api not in APIS:
        raise ValueError(f"policy must be one of {POLICIES} and api one of {APIS}")
    if api == "openai" and (policy != "model" or not base_url):
        raise ValueError("api=openai evaluates a served model: it needs policy=model and a base URL")
    engine, layout, tok, model_name = None, None, None, None
    if api == "openai":
        from agentrl.chat import ChatClient

        engine, model_name = ChatClient(base_url, model=ev.model_name), ev.model_name or base_url
    else:
        try:
            model_dir = model_dir or model_for_eval(recipe)
        except FileNotFoundError:
            if policy == "model":
                raise
        if model_dir is None:  # reference policies need only a tokenizer: the one init-model builds
            from agentrl.model.tokenizer import build_tokenizer

            tok = build_tokenizer()
        else:
            tok = AutoTokenizer.from_pretrained(model_dir)
        model_name = model_dir if policy == "model" else None
        if policy == "model" and base_url:
            from agentrl.engine.client import EngineClient

            engine = EngineClient(base_url)
        elif policy == "model":
            from agentrl.engine.engine import Engine

            engine = Engine.from_pretrained(model_dir, dtype=recipe.engine.dtype).start()
            layout = engine.layout
    jobs = eval_jobs(recipe)
    try:
        records = asyncio.run(_play(recipe, policy, api, engine, tok, layout, jobs, progress))
    finally:
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()
    summary = summarize(records, ev.samples, policy, model_name)
    write_outputs(run_dir(recipe) / "eval", policy, records, summary)
    return summary
