"""Supervised warm-up on scripted demonstrations, and the scripted policy that produces them.

Owns: `ScriptedPolicy` (an InferenceEngine that plays an env's `demonstration` turns), `collect_demos`
(demonstration episodes through the real agent loop, so demos have exactly the token layout of
rollouts: same chat template, same env continuation text, loss mask on the assistant's tokens),
and `warm_up` (next-token cross-entropy on the loss-masked tokens, packed batches).
Does not own: RL updates (agentrl.learner) or environments.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import torch
from tqdm import tqdm

from agentrl.engine.types import GenerateOutput, GenerateRequest, SamplingParams
from agentrl.learner.batch import build_batch, sequence_tensor, target_logprobs
from agentrl.learner.learner import lr_lambda
from agentrl.rollout import run_episode
from agentrl.trajectory import Trajectory


class ScriptedPolicy:
    """Answers each generate call with the next scripted assistant turn (then the end-of-turn token).
    A real, deterministic policy: a reference for harness checks and the source of warm-up demos."""

    def __init__(self, turns: list[str], tokenizer) -> None:
        self.turns, self.tok, self.i = list(turns), tokenizer, 0

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        text = self.turns[self.i] if self.i < len(self.turns) else ""
        self.i += 1
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return GenerateOutput(rid=request.rid, output_ids=ids, finish_reason={"type": "stop", "matched": ids[-1]},
                              prompt_tokens=len(request.input_ids), completion_tokens=len(ids), cached_tokens=0,
                              weight_version=0, output_logprobs=[0.0] * len(ids), output_versions=[0] * len(ids))


def collect_demos(make_env: Callable[[], object], tokenizer, seeds, max_total_tokens: int = 4096) -> list[Trajectory]:
    """One scripted episode per seed (the env's `demonstration` of its task), through `run_episode`."""

    async def one(seed: int) -> Trajectory:
        env = make_env()
        env.reset(seed=seed)
        policy = ScriptedPolicy(env.demonstration(env.current_task), tokenizer)
        return await run_episode(policy, make_env(), tokenizer, SamplingParams(), seed=seed,
                                 max_total_tokens=max_total_tokens)

    async def all_():
        return await asyncio.gather(*(one(s) for s in seeds))

    return list(asyncio.run(all_()))


def warm_up(model, demos: list[Trajectory], steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
            progress: bool = True, lr_schedule: str = "constant", warmup_steps: int = 0,
            grad_clip: float = 0.0) -> list[float]:
    """Behaviour cloning on the demos' loss-masked tokens (AdamW, packed batches, fp32), at `lr` on the
    schedule `lr_schedule` over `steps` (see agentrl.learner.learner.lr_lambda), the global gradient
    norm clipped to `grad_clip` (0 = off). Returns the loss per step."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(lr_schedule, warmup_steps, steps))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="warm-up", disable=None if progress else True, leave=False):
        batch = rng.sample(demos, min(batch_size, len(demos)))
        mb = build_batch(batch, None, "packed", max(len(t) for t in batch), with_routing=False)
        logits = model(mb.input_ids, segment_ids=mb.segment_ids).logits
        logp, _ = target_logprobs(logits, mb)
        mask = sequence_tensor(batch, "loss_mask", torch.bool)
        loss = -(logp * mask).sum() / mask.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
