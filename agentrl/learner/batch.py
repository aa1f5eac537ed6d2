"""Trajectories -> model inputs, packed (no padding waste) or padded, with routing rows aligned.

Owns: `build_batch`, which lays out a list of trajectories for one learner forward, and
`per_sequence`, which maps per-token model outputs back to a `[n_seq, max_len]` view where the
pure loss functions of agentrl.algo work (one row = one trajectory, whatever the layout).
Does not own: losses (agentrl.algo) or the optimisation loop (learner.py).

Layouts
- packed: all sequences concatenated into rows of at most `max_tokens` tokens; `segment_ids` gives
  each sequence its own block-diagonal causal attention and positions restart at 0 per sequence.
- padded: one sequence per row, right-padded, with an attention mask.
- packed with `share_prefix`: the members of a GRPO group (same `Trajectory.group_id`) share their
  prompt token for token, so their longest common prefix (s tokens) is computed once per row:
  `[prefix 0..s-1][suffix of member a (tokens s..)][suffix of member b]...`. A suffix token attends
  causally to its own suffix and to the prefix (`parent_ids`), positions continue at s
  (`position_ids`); log-probs, losses and gradients are those of the plain packed layout (the prefix's
  activations are the same; its gradient accumulates from every member). With routing rows the
  prefix also stops where the members' rows stop agreeing (a shared token has one row: member a's).
Routing rows (Contract 1/3) are aligned to the same order with agentrl.routing.align_packed /
align_padded; tokens without a row (the last token of each sequence, padding, rows an engine did
not return) are routed freely (`routing_mask` False).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from agentrl.routing import RoutingLayout, align_packed, align_padded, row_version_report
from agentrl.trajectory import Trajectory


MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a shared row


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
    # shared-prefix rows only (None otherwise): each token's parent segment (-1 = none) and position
    parent_ids: torch.Tensor | None = None  # [R, S] int64
    position_ids: torch.Tensor | None = None  # [R, S] int64

    def to(self, device: str | torch.device) -> ModelBatch:
        """The same batch with every tensor on `device` (a no-op copy-free view on the same device)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

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

    @property
    def token_weights(self) -> torch.Tensor:
        """[R, S] float32: how many sequence tokens each position stands for: 1 for a plain token, 0 for
        padding, the number of members for a shared prefix's token. Batch-level averages over tokens (the
        load-balancing loss) weighted by it are those of every sequence run separately, whatever the layout."""
        idx = self.flat_index[self.flat_index >= 0]
        return torch.bincount(idx, minlength=self.input_ids.numel()).view(self.input_ids.shape).float()

    @property
    def computed_tokens(self) -> int:
        """Real tokens the forward computes (no padding): num_tokens less what shared prefixes save."""
        if self.segment_ids is not None:
            return int((self.segment_ids >= 0).sum())
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()


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
                max_tokens: int = 4096, with_routing: bool = True, share_prefix: bool = False,
                min_prefix: int = MIN_SHARED_PREFIX) -> ModelBatch:
    """Lay out `trajs` for one forward. Packed rows hold at most max(max_tokens, longest sequence)
    tokens; `share_prefix` (packed only) computes a group's common prefix once per row when it has
    at least `min_prefix` tokens (falls back to the plain packed batch when nothing is shared)."""
    lens = [len(t) for t in trajs]
    n, lmax = len(trajs), max(lens)
    use_rows = with_routing and layout is not None and all(t.routing is not None for t in trajs)
    if share_prefix and mode == "packed":
        shared = _build_shared(trajs, lens, layout if use_rows else None, max_tokens, min_prefix)
        if shared is not None:
            return shared
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


def _common_prefix(seqs: list[np.ndarray]) -> int:
    """Length of the longest common prefix of equal-dtype arrays (compared along axis 0)."""
    s = min(len(x) for x in seqs)
    first = seqs[0]
    for x in seqs[1:]:
        diff = first[:s] != x[:s]
        if diff.ndim > 1:
            diff = diff.reshape(s, -1).any(-1)
        hit = np.flatnonzero(diff)
        s = int(hit[0]) if len(hit) else s
        if s == 0:
            break
    return s


def shared_prefix_lengths(trajs: list[Trajectory], rows: list[tuple[np.ndarray, np.ndarray]] | None = None,
                          min_prefix: int = MIN_SHARED_PREFIX) -> dict[str, int]:
    """group_id -> the prefix its members can share: the longest common prefix of their token ids,
    cut where their aligned routing rows (`rows[i]` = (experts [len_i, L, k], has_row [len_i])) stop
    agreeing, at most min(len) - 1; groups with one member, an empty group_id, or a prefix shorter
    than `min_prefix` get none (absent)."""
    members: dict[str, list[int]] = {}
    for i, t in enumerate(trajs):
        if t.group_id:
            members.setdefault(t.group_id, []).append(i)
    out = {}
    for g, idx in members.items():
        if len(idx) < 2:
            continue
        s = min(_common_prefix([trajs[i].tokens for i in idx]), min(len(trajs[i]) for i in idx) - 1)
        if rows is not None and s > 0:
            s = min(s, _common_prefix([rows[i][0][:s] for i in idx]), _common_prefix([rows[i][1][:s] for i in idx]))
        if s >= min_prefix:
            out[g] = s
    return out


def _build_shared(trajs: list[Trajectory], lens: list[int], layout: RoutingLayout | None, max_tokens: int,
                  min_prefix: int) -> ModelBatch | None:
    """The shared-prefix packed batch, or None when no group shares a prefix (rows given = layout set)."""
    n, lmax = len(trajs), max(lens)
    rows = ([align_packed([t.routing], [len(t)], layout) for t in trajs] if layout is not None else None)
    prefix = shared_prefix_lengths(trajs, rows, min_prefix)
    if not prefix:
        return None
    budget = max(max_tokens, lmax)
    # units: (members, s): a plain sequence is ([i], 0); a shared block repeats the prefix once and
    # holds as many members' suffixes as fit the row budget (a block left with one member is plain)
    units: list[tuple[list[int], int]] = []
    done: set[str] = set()
    for i, t in enumerate(trajs):
        s = prefix.get(t.group_id, 0)
        if not s:
            units.append(([i], 0))
            continue
        if t.group_id in done:
            continue
        done.add(t.group_id)
        block, width = [], s
        for j in (j for j in range(n) if trajs[j].group_id == t.group_id):
            if block and width + lens[j] - s > budget:
                units.append((block, s if len(block) > 1 else 0))
                block, width = [], s
            block.append(j)
            width += lens[j] - s
        units.append((block, s if len(block) > 1 else 0))
    widths = [u[1] + sum(lens[j] - u[1] for j in u[0]) for u in units]
    packing = _pack_rows(widths, max_tokens)
    width = max(sum(widths[u] for u in g) for g in packing)
    shape = (len(packing), width)
    ids = torch.zeros(shape, dtype=torch.long)
    seg = torch.full(shape, -1, dtype=torch.long)
    parent = torch.full(shape, -1, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    flat_index = torch.full((n, lmax), -1, dtype=torch.long)
    routing = rmask = None
    if rows is not None:
        routing = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(
            np.arange(layout.top_k), (*shape, layout.num_moe_layers, layout.top_k)))).long()
        rmask = torch.zeros(shape, dtype=torch.bool)  # padding rows: distinct ids, routed freely

    def put(r: int, off: int, i: int, lo: int, hi: int, segment: int, par: int) -> None:
        """Tokens lo..hi-1 of sequence i at row r, columns off.. ."""
        k = hi - lo
        ids[r, off: off + k] = torch.from_numpy(trajs[i].tokens[lo:hi])
        seg[r, off: off + k], parent[r, off: off + k] = segment, par
        pos[r, off: off + k] = torch.arange(lo, hi)
        if rows is not None:
            routing[r, off: off + k] = torch.from_numpy(rows[i][0][lo:hi].astype(np.int64))
            rmask[r, off: off + k] = torch.from_numpy(rows[i][1][lo:hi])

    next_seg = n  # prefix segments get ids n, n+1, ... (sequence i's own tokens are segment i)
    for r, g in enumerate(packing):
        off = 0
        for u in g:
            members, s = units[u]
            if s == 0:
                i = members[0]
                put(r, off, i, 0, lens[i], i, -1)
                flat_index[i, : lens[i]] = r * width + off + torch.arange(lens[i])
                off += lens[i]
                continue
            put(r, off, members[0], 0, s, next_seg, -1)  # the shared prefix: member a's rows
            for i in members:
                flat_index[i, :s] = r * width + off + torch.arange(s)
            off += s
            for i in members:
                put(r, off, i, s, lens[i], i, next_seg)
                flat_index[i, s: lens[i]] = r * width + off + torch.arange(lens[i] - s)
                off += lens[i] - s
            next_seg += 1
    return ModelBatch(ids, None, seg, routing, rmask, flat_index, lens, parent_ids=parent, position_ids=pos)


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
    logp_all = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])  # [R*S, V]
    ent = -(logp_all.exp() * logp_all).sum(-1)  # [R*S]
    # token t of sequence i sits at flat_index[i, t] and is predicted at flat_index[i, t-1] (in a
    # shared-prefix row these are not always neighbours)
    cur, prev = batch.flat_index[:, 1:], batch.flat_index[:, :-1]
    valid = cur >= 0
    tok = batch.input_ids.reshape(-1)[cur.clamp_min(0)]
    n, lmax = batch.flat_index.shape
    lp = torch.zeros(n, lmax, dtype=torch.float32, device=logits.device)
    en = torch.zeros_like(lp)
    lp[:, 1:] = torch.where(valid, logp_all[prev.clamp_min(0), tok], 0.0)
    en[:, 1:] = torch.where(valid, ent[prev.clamp_min(0)], 0.0)
    return lp, en


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
