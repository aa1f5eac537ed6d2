"""Token sampling: temperature, top-k, top-p, per-request seeded generators, and logprobs.

The logprob returned for a token is log π(token) under the temperature-scaled distribution
*before* top-k / top-p truncation (at temperature 1 this is the model's own log-probability, the
behaviour logprob RL corrections need). Greedy (temperature 0) reports the untempered logprob.
"""

from __future__ import annotations

import torch

from agentrl.engine.types import SamplingParams


def sample_one(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> tuple[int, float]:
    """logits [V] float32 -> (token id, its logprob)."""
    if p.temperature == 0:
        tok = int(torch.argmax(logits))
        return tok, float(torch.log_softmax(logits, -1)[tok])
    scaled = logits / p.temperature
    logp = torch.log_softmax(scaled, -1)
    masked = scaled
    if p.top_k > 0 and p.top_k < masked.shape[-1]:
        kth = torch.topk(masked, p.top_k).values[-1]
        masked = masked.masked_fill(masked < kth, float("-inf"))
    if p.top_p < 1.0:
        probs_sorted, order = torch.sort(torch.softmax(masked, -1), descending=True)
        cum = probs_sorted.cumsum(-1)
        drop = cum - probs_sorted >= p.top_p  # keep the smallest prefix whose mass reaches top_p
        masked = masked.clone()
        masked[order[drop]] = float("-inf")
    tok = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen))
    return tok, float(logp[tok])
