"""Trajectories -> model inputs, packed (no padding waste) or padded, with routing rows aligned.

Owns: `build_batch`, which lays out a list of trajectories for one learner forward, and
`per_sequence`, which maps per-token model outputs back to a `[n_seq, max_len]` view where the
pure loss functions of agentrl.algo work (one row = one trajectory, whatever the layout).
Does not own: losses (agentrl.algo) or the optimisation loop (learner.py).

Layouts
- packed: all sequences concatenated into rows of at most `max_tokens` tokens; `segment_ids` gives
  each sequence its own block-diagonal causal attention and positions restart at 0 per sequence.
- padded: one sequence per row, right-padded, with an attention mask.
Routing rows (Contract 1/3) are aligned to the same order with agentrl.routing.align_packed /
align_padded; tokens without a row (the last token of each sequence, padding, rows an engine did
not return) are routed freely (`routing_mask` False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from agentrl.routing import RoutingLayout, align_packed, align_padded, row_version_report
from agentrl.trajectory import Trajectory


@dataclass
class ModelBatch:
    """One forward's inputs. R rows of S tokens."""

    input_ids: torch.Tensor  # [R, S] int64
    attention_mask: torch.Tensor | None  # [R, S] (padded layout)
    segment_ids: torch.Tensor | None  # [R, S] (packed layout; padding gets its own segment id -1)
    routing: torch.Tensor | None  # [R, S, moe_layers, k] int64 (engine rows, R3)
    routing_mask: torch.Tensor | None  # [R, S] bool: token has a row
    flat_index: torch.Tensor  # [n_seq, max_len] int64 position in the flattened [R*S], -1 past the end
    seq_lens: list[int]
    # generated tokens (loss_mask) as (sequence, position t >= 1) pairs, and the flat [R*S] index of the
    # position t-1 that predicts each: the only logits a policy-gradient loss reads
    target_seq: torch.Tensor | None = None  # [K] int64
    target_pos: torch.Tensor | None = None  # [K] int64
    logits_index: torch.Tensor | None = None  # [K] int64

    def with_targets(self, loss_mask: torch.Tensor) -> ModelBatch:
        """Mark the tokens whose log-probabilities are wanted (loss_mask [n_seq, >= max_len] bool)."""
        m = loss_mask[:, : self.flat_index.shape[1]].clone()
        m[:, 0] = False  # nothing predicts the first token
        seq, pos = m.nonzero(as_tuple=True)
        self.target_seq, self.target_pos = seq, pos
        self.logits_index = self.flat_index[seq, pos - 1]
        return self

    @property
    def num_tokens(self) -> int:
        return int(sum(self.seq_lens))


def _pack_rows(lens: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy first-fit of sequence indices into rows of at most max_tokens (longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):
        for r, free in enumerate(room):
            if lens[i] <= free:
                rows[r].append(i)
                room[r] -= lens[i]
                break
        else:
            rows.append([i])
            room.append(max(max_tokens, lens[i]) - lens[i])
    return rows


def build_batch(trajs: list[Trajectory], layout: RoutingLayout | None, mode: Literal["packed", "padded"] = "packed",
                max_tokens: int = 4096, with_routing: bool = True) -> ModelBatch:
    lens = [len(t) for t in trajs]
    n, lmax = len(trajs), max(lens)
    use_rows = with_routing and layout is not None and all(t.routing is not None for t in trajs)
    flat_index = torch.full((n, lmax), -1, dtype=torch.long)
    if mode == "padded":
        ids = torch.zeros(n, lmax, dtype=torch.long)
        att = torch.zeros(n, lmax, dtype=torch.long)
        for i, t in enumerate(trajs):
            ids[i, : lens[i]] = torch.from_numpy(t.tokens)
            att[i, : lens[i]] = 1
            flat_index[i, : lens[i]] = i * lmax + torch.arange(lens[i])
        routing = rmask = None
        if use_rows:
            ex, has = align_padded([t.routing for t in trajs], lens, layout, max_len=lmax)
            routing, rmask = torch.from_numpy(ex.astype(np.int64)), torch.from_numpy(has)
        return ModelBatch(ids, att, None, routing, rmask, flat_index, lens)
    if mode != "packed":
        raise ValueError(f"mode must be 'packed' or 'padded', got {mode!r}")
    groups = _pack_rows(lens, max_tokens)
    width = max(sum(lens[i] for i in g) for g in groups)
    ids = torch.zeros(len(groups), width, dtype=torch.long)
    seg = torch.full((len(groups), width), -1, dtype=torch.long)
    routing = torch.zeros(len(groups), width, layout.num_moe_layers, layout.top_k, dtype=torch.long) if use_rows else None
    rmask = torch.zeros(len(groups), width, dtype=torch.bool) if use_rows else None
    for r, g in enumerate(groups):
        if use_rows:
            ex, has = align_packed([trajs[i].routing for i in g], [lens[i] for i in g], layout)
            routing[r, : len(has)] = torch.from_numpy(ex.astype(np.int64))
            rmask[r, : len(has)] = torch.from_numpy(has)
            routing[r, len(has):] = torch.arange(layout.top_k)  # padding rows: distinct ids, routed freely
        off = 0
        for i in g:
            ids[r, off: off + lens[i]] = torch.from_numpy(trajs[i].tokens)
            seg[r, off: off + lens[i]] = i
            flat_index[i, : lens[i]] = r * width + off + torch.arange(lens[i])
            off += lens[i]
    return ModelBatch(ids, None, seg, routing, rmask, flat_index, lens)


def per_sequence(values: torch.Tensor, batch: ModelBatch, fill: float = 0.0) -> torch.Tensor:
    """[R, S, ...] per-token model outputs -> [n_seq, max_len, ...] (one row per trajectory)."""
    flat = values.reshape(-1, *values.shape[2:])
    idx = batch.flat_index.clamp_min(0)
    out = flat[idx]
    valid = (batch.flat_index >= 0).reshape(*batch.flat_index.shape, *([1] * (values.dim() - 2)))
    return torch.where(valid, out, torch.full_like(out, fill))


def target_logprobs(logits: torch.Tensor, batch: ModelBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """logp[i, t] = log π(token t | tokens < t) for every trajectory i, and the per-token entropy of
    that distribution; both [n_seq, max_len] float32, 0 at t = 0 and past the end.
    With logits [K, V] for the batch's targets only (the model's ``logits_index=batch.logits_index``,
    after ``batch.with_targets``), the same values at the target tokens and 0 elsewhere."""
    if logits.dim() == 2:
        if batch.logits_index is None or logits.shape[0] != batch.logits_index.shape[0]:
            raise ValueError("2-D logits must be the batch's targets (model(..., logits_index=batch.logits_index))")
        logp_all = torch.log_softmax(logits.float(), dim=-1)  # [K, V]
        tgt = batch.input_ids.reshape(-1)[batch.flat_index[batch.target_seq, batch.target_pos]]
        n, lmax = batch.flat_index.shape
        lp = torch.zeros(n, lmax, dtype=torch.float32, device=logits.device)
        en = torch.zeros_like(lp)
        lp = lp.index_put((batch.target_seq, batch.target_pos), logp_all.gather(-1, tgt[:, None])[:, 0])
        en = en.index_put((batch.target_seq, batch.target_pos), -(logp_all.exp() * logp_all).sum(-1))
        return lp, en
    logp_all = torch.log_softmax(logits.float(), dim=-1)  # [R, S, V]
    ids = batch.input_ids
    # position s predicts token s+1 of the same row; the shifted gather is masked per sequence below
    nxt = torch.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    tok_lp = logp_all.gather(-1, nxt[..., None])[..., 0]  # [R, S]: logp of the next token at s
    ent = -(logp_all.exp() * logp_all).sum(-1)  # [R, S]
    pred_lp = per_sequence(tok_lp, batch)  # [n, L]: at t, logp of token t+1
    pred_ent = per_sequence(ent, batch)
    n, lmax = pred_lp.shape
    lp = torch.zeros(n, lmax, dtype=torch.float32, device=logits.device)
    en = torch.zeros_like(lp)
    lp[:, 1:] = pred_lp[:, :-1]
    en[:, 1:] = pred_ent[:, :-1]
    lens = torch.tensor(batch.seq_lens)
    valid = torch.arange(lmax)[None, :] < lens[:, None]
    return lp * valid, en * valid


def sequence_tensor(trajs: list[Trajectory], field: str, dtype: torch.dtype, fill=0) -> torch.Tensor:
    """A per-token trajectory field as [n_seq, max_len]."""
    lmax = max(len(t) for t in trajs)
    out = torch.full((len(trajs), lmax), fill, dtype=dtype)
    for i, t in enumerate(trajs):
        out[i, : len(t)] = torch.from_numpy(np.asarray(getattr(t, field))).to(dtype)
    return out


def rows_report(trajs: list[Trajectory], current_version: int) -> dict[str, int]:
    """Rows present / missing / from an older policy version over a batch (Contract 1)."""
    versions = [t.routing.versions if t.routing is not None else np.zeros(0, np.int64) for t in trajs]
    return row_version_report(versions, [len(t) for t in trajs], current_version)
