"""Token sampling: temperature, top-k, top-p, per-request seeded generators, and logprobs.

A token is drawn by inverse CDF: one uniform u in (0, 1] per row from the row's generator (seeded
requests own one; the rest share the engine's), and the first token whose cumulative probability
(float64) reaches u times the total. One uniform per token keeps a batch of rows with different
generators a few vectorised ops, and a seeded request reproducible whatever batch it lands in.

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
    u = 1.0 - torch.rand((), generator=gen, dtype=torch.float64)
    tok = int(_inverse_cdf(torch.softmax(masked, -1)[None], u[None])[0])
    return tok, float(logp[tok])


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [B, V], u [B] float64 in (0, 1] -> [B] int64: first j with cdf[j] >= u * cdf[-1] (never a
    zero-probability token: cdf is flat across those)."""
    cdf = probs.double().cumsum(-1)
    target = (u * cdf[:, -1]).to(cdf.dtype)[:, None]
    return torch.searchsorted(cdf, target)[:, 0].clamp_max(probs.shape[-1] - 1)


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 gens: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """logits [B, V] float32 -> (token ids, their logprobs), the same rule as `sample_one` for each row,
    computed for the whole batch at once: one uniform per sampled row, rows that share a generator
    (None = torch's global one) drawing theirs in one call."""
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
    drawn = [i for i, p in enumerate(params) if p.temperature != 0]
    if drawn:
        by_gen: dict[int, list[int]] = {}  # rows sharing a generator take consecutive draws of one call
        for i in drawn:
            by_gen.setdefault(id(gens[i]), []).append(i)
        rows = [i for js in by_gen.values() for i in js]
        u = 1.0 - torch.cat([torch.rand(len(js), generator=gens[js[0]], dtype=torch.float64)
                             for js in by_gen.values()])
        toks[rows] = _inverse_cdf(probs[rows], u)
    lps = logp.gather(1, toks[:, None])[:, 0]
    return toks.tolist(), lps.tolist()
