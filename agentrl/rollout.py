"""The agent loop: drive one episode env <-> engine, token in / token out, into a Trajectory.

Owns: `run_episode` (one episode) and `run_episodes` (many, concurrently, GRPO groups).
Does not own: environments (agentrl.env), engines (agentrl.engine), training.

Token exactness (Contract 2): the initial messages are chat-templated and tokenized once; after
that the sequence only grows by appending the engine's sampled ids (never re-tokenized) and the
tokenization of the environment's new text (tool results, next user turn), rendered with the same
chat template. Routing rows are fetched incrementally: each turn asks the engine only for rows
from `routed_experts_start_len` = rows already held, and the increments are stitched into the
episode's N-1 rows (agentrl.routing.concat_increments).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import traceback
import weakref
from collections.abc import Callable, Sequence

import numpy as np

from agentrl.engine.types import GenerateRequest, InferenceEngine, SamplingParams
from agentrl.routing import RoutingLayout, RoutingRows, concat_increments
from agentrl.trajectory import Trajectory

_DUMMY = [{"role": "user", "content": "."}]
_PROMPTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {messages + tools: ids}


def prompt_ids(tokenizer, messages: list[dict], tools: list | None) -> tuple[int, ...]:
    """The chat-templated, tokenized opening of an episode. Memoized (a GRPO group's episodes open
    with the same messages): rendering the template and tokenizing was ~13% of a rollout worker's CPU."""
    cache = _PROMPTS.setdefault(tokenizer, {})
    key = json.dumps([messages, tools], sort_keys=True, default=str)
    ids = cache.get(key)
    if ids is None:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(cache) >= 4096:
            cache.clear()
        cache[key] = ids
    return ids


def render_continuation(tokenizer, messages: list[dict], closed: bool) -> str:
    """Chat-template text that follows an assistant turn for the environment's new `messages`,
    ending with the next assistant header. `closed` = the model already emitted its end-of-turn
    token (then only the template's newline after it is added)."""
    base = tokenizer.apply_chat_template(_DUMMY, tokenize=False)
    full = tokenizer.apply_chat_template(_DUMMY + messages, tokenize=False, add_generation_prompt=True)
    assert full.startswith(base), "chat template is not prefix-stable"
    end_of_turn = "\n" if closed else tokenizer.eos_token + "\n"
    return end_of_turn + full[len(base):]


async def run_episode(engine: InferenceEngine, env, tokenizer, sampling: SamplingParams, *, seed: int | None = None,
                      layout: RoutingLayout | None = None, max_total_tokens: int = 4096,
                      group_id: str = "", options: dict | None = None) -> Trajectory:
    """Play one episode. Never raises for env or engine failures: they end the episode with status
    env_error / engine_error (the partial trajectory is kept for inspection; learners skip it)."""
    tokens: list[int] = []
    mask: list[bool] = []
    logprobs: list[float] = []
    versions: list[int] = []
    parts: list[RoutingRows] = []
    turn_rewards: list[float] = []
    reward, status, turns, info = 0.0, "ok", 0, {}

    def append(ids, gen: bool, lps=None, vers=None) -> None:
        tokens.extend(ids)
        mask.extend([gen] * len(ids))
        logprobs.extend(lps if lps is not None else [0.0] * len(ids))
        versions.extend(vers if vers is not None else [-1] * len(ids))

    try:
        obs, info = env.reset(seed=seed, options=options)
        append(prompt_ids(tokenizer, obs, info.get("tools") or None), False)
    except Exception:
        return _trajectory(tokens, mask, logprobs, versions, None, 0.0, "env_error", [], 0, 0, group_id,
                           {"error": traceback.format_exc(limit=3)})
    prompt_len = len(tokens)
    eos = tokenizer.eos_token_id
    while True:
        req = GenerateRequest(list(tokens), sampling, return_logprob=True,
                              return_routed_experts=layout is not None,
                              routed_experts_start_len=sum(len(p) for p in parts))
        try:
            out = await engine.generate(req)
        except Exception as e:
            status, info = "engine_error", {**info, "error": f"{type(e).__name__}: {e}"}
            break
        if out.finish_reason.get("type") == "abort":
            status, info = "engine_error", {**info, "error": f"aborted: {out.finish_reason}"}
            break
        append(out.output_ids, True, out.output_logprobs, out.output_versions)
        if layout is not None:
            parts.append(RoutingRows(out.routed_experts, np.asarray(out.routed_versions, dtype=np.int64),
                                     start=req.routed_experts_start_len))
        turns += 1
        action = tokenizer.decode(out.output_ids, skip_special_tokens=False)
        closed = bool(out.output_ids) and out.output_ids[-1] == eos
        if closed:
            action = action[: -len(tokenizer.eos_token)]
        try:
            obs, r, terminated, truncated, step_info = await env.astep(action)
        except Exception:
            status, info = "env_error", {**info, "error": traceback.format_exc(limit=3)}
            break
        info = {**info, **step_info}
        turn_rewards.append(float(step_info.get("turn_reward", 0.0)))
        if terminated or truncated:
            # the step reward is turn shaping + final reward; the episode's reward is the final one
            final = step_info.get("final_reward")
            reward = float(final) if final is not None else float(r) - turn_rewards[-1]
            status = "truncated" if truncated and not terminated else "ok"
            break
        env_ids = tokenizer(render_continuation(tokenizer, obs, closed), add_special_tokens=False)["input_ids"]
        if len(tokens) + len(env_ids) + 1 >= max_total_tokens:
            status = "truncated"
            break
        append(env_ids, False)
    routing = concat_increments(parts) if parts else None
    if routing is not None and len(routing) < len(tokens) - 1:
        status = "engine_error" if status == "ok" else status  # rows must cover every fed token
    return _trajectory(tokens, mask, logprobs, versions, routing, reward, status, turn_rewards, prompt_len, turns,
                       group_id, info)


def _trajectory(tokens, mask, logprobs, versions, routing, reward, status, turn_rewards, prompt_len, turns,
                group_id, info) -> Trajectory:
    return Trajectory(
        tokens=np.asarray(tokens, dtype=np.int64), loss_mask=np.asarray(mask, dtype=bool),
        logprobs=np.asarray(logprobs, dtype=np.float32), versions=np.asarray(versions, dtype=np.int64),
        routing=routing, reward=reward, status=status, turn_rewards=turn_rewards, prompt_len=prompt_len,
        group_id=group_id, task_id=str(info.get("task_id", "")), turns=turns,
        info={k: v for k, v in info.items() if k != "tools"},
    )


async def run_episodes(engines: InferenceEngine | Sequence[InferenceEngine], make_env: Callable[[], object],
                       tokenizer, sampling: SamplingParams, seeds: Sequence[int], group_size: int = 1,
                       concurrency: int = 64, layout: RoutingLayout | None = None, max_total_tokens: int = 4096,
                       progress: Callable[[Trajectory], None] | None = None,
                       abort_retries: int = 3) -> list[Trajectory]:
    """`group_size` episodes per task seed (a GRPO group: same task, so the same prompt prefix, which
    the engine's radix cache shares), at most `concurrency` at once, engines used round-robin.
    An episode whose request the engine aborted (a weight update with in_flight="abort") is played
    again from the start, up to `abort_retries` times. Returns trajectories in (seed, sample) order."""
    engines = list(engines) if isinstance(engines, Sequence) else [engines]
    sem = asyncio.Semaphore(concurrency)
    rr = itertools.cycle(engines)
    jobs = [(seed, k, next(rr)) for seed in seeds for k in range(group_size)]

    async def one(seed: int, k: int, eng) -> Trajectory:
        # a seeded sampler gets a distinct stream per episode, else a group would repeat one sample
        samp = sampling if sampling.seed is None else dataclasses.replace(
            sampling, seed=sampling.seed + 1_000_003 * seed + 7919 * k)
        async with sem:
            for attempt in range(abort_retries + 1):
                traj = await run_episode(eng, make_env(), tokenizer, samp, seed=seed, layout=layout,
                                         max_total_tokens=max_total_tokens, group_id=str(seed))
                if not str(traj.info.get("error", "")).startswith("aborted"):
                    break
            traj.info["attempts"] = attempt + 1
        if progress is not None:
            progress(traj)
        return traj

    return list(await asyncio.gather(*(one(s, k, e) for s, k, e in jobs)))
