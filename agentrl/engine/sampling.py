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


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 gens: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """logits [B, V] float32 -> (token ids, their logprobs), the same rule as `sample_one` for each row,
    computed for the whole batch at once. Rows with their own (seeded) generator draw from it, one row
    at a time; the others share one multinomial call."""
    b = logits.shape[0]
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    greedy = temps == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
    logp = torch.log_softmax(scaled, -1)
    masked = scaled
    top_k = [p.top_k if 0 < p.top_k < logits.shape[-1] else 0 for p in params]
    if any(top_k):
        kmax = max(top_k)
        vals = torch.topk(masked, kmax, dim=-1).values  # [B, kmax] descending
        k_idx = torch.tensor([max(k, 1) - 1 for k in top_k])
        kth = vals.gather(1, k_idx[:, None])
        kth = torch.where(torch.tensor(top_k)[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
        masked = masked.masked_fill(masked < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
    if (top_p < 1.0).any():
        probs_sorted, order = torch.sort(torch.softmax(masked, -1), dim=-1, descending=True)
        cum = probs_sorted.cumsum(-1)
        drop_sorted = (cum - probs_sorted >= top_p[:, None]) & (top_p[:, None] < 1.0)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        masked = masked.masked_fill(drop, float("-inf"))
    probs = torch.softmax(masked, -1)
    toks = torch.argmax(logits, -1)
    free = [i for i in range(b) if not greedy[i] and gens[i] is None]
    if free:
        toks[free] = torch.multinomial(probs[free], 1)[:, 0]
    for i in range(b):
        if not greedy[i] and gens[i] is not None:
            toks[i] = torch.multinomial(probs[i], 1, generator=gens[i])[0]
    lps = logp.gather(1, toks[:, None])[:, 0]
    return toks.tolist(), lps.tolist()
