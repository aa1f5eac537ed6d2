"""One engine step: a ragged batch of new tokens through the model over slot-addressed KV.

Owns: `paged_forward`, which runs the model's own submodules (so weights, RoPE, routing are
exactly the learner's code) on the flat list of new tokens of every scheduled request (prefill
chunks and single decode tokens together), writes their K/V into the pool, attends over each
request's slots, and returns the logits wanted plus the routing the MoE layers chose for every
new token. Does not own: which tokens are scheduled (engine.py) or sampling (sampling.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from agentrl.engine.memory import SlotPool
from agentrl.model.gemm import linear
from agentrl.model.modeling import MoEForCausalLM, apply_rope, rope_cos_sin


@dataclass
class Segment:
    """The new tokens of one request in this step."""

    ids: list[int]  # new token ids
    start: int  # position of ids[0] in the sequence (= tokens already in KV)
    slots: np.ndarray  # [start + len(ids)] int64: KV slots of the whole sequence so far, new ones last
    want_logits: bool  # does the last new token's next-token distribution get sampled


@dataclass
class _Group:
    """Segments attended in one SDPA call: padded queries [B, nmax] over padded keys [B, Lmax]."""

    kidx: torch.Tensor  # [B, Lmax] KV slots of each segment's whole sequence (0-padded)
    mask: torch.Tensor  # [B, 1, nmax, Lmax] bool: key j visible to query t (causal within the sequence)
    qidx: torch.Tensor  # [B, nmax] position of each query in the step's flat token list (0-padded)
    qvalid: torch.Tensor  # [B, nmax] bool
    tok: torch.Tensor | None  # [Nq] flat positions of the real queries, in qidx[qvalid] order (None: all T, in order)
    decode: bool  # one query per segment


def _group(segs: list[Segment], offsets: list[int], total: int, device) -> _Group:
    """Built once per step on the host, shared by all layers."""
    lens = [len(s.slots) for s in segs]
    ns = [len(s.ids) for s in segs]
    b, lmax, nmax = len(segs), max(lens), max(ns)
    kidx = np.zeros((b, lmax), dtype=np.int64)
    qidx = np.zeros((b, nmax), dtype=np.int64)
    qpos = np.zeros((b, nmax), dtype=np.int64)  # padded queries see key 0 only (no NaN rows; discarded)
    for i, s in enumerate(segs):
        kidx[i, : lens[i]] = s.slots
        qidx[i, : ns[i]] = np.arange(offsets[i], offsets[i] + ns[i])
        qpos[i, : ns[i]] = np.arange(s.start, s.start + ns[i])
    qvalid = np.arange(nmax)[None, :] < np.array(ns)[:, None]
    mask = np.arange(lmax)[None, None, :] <= qpos[:, :, None]
    t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    tok = qidx[qvalid]
    whole = nmax == 1 and b == total and bool((tok == np.arange(total)).all())  # every token, in order
    return _Group(t(kidx), t(mask[:, None]), t(qidx), t(qvalid), None if whole else t(tok), nmax == 1)


def _attend(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, g: _Group) -> torch.Tensor:
    """q [T, nh, D] (the step's queries) -> attention output of the group's real queries [Nq, nh, D]."""
    b, lmax = g.kidx.shape
    nh, d, nkv = q.shape[1], q.shape[2], k_pool.shape[1]
    flat = g.kidx.reshape(-1)  # index_select copies rows ~6x faster than advanced indexing on CPU
    k = k_pool.index_select(0, flat).view(b, lmax, nkv, d).transpose(1, 2)  # [B, nkv, Lmax, D]
    v = v_pool.index_select(0, flat).view(b, lmax, nkv, d).transpose(1, 2)
    if g.decode:
        # one query per sequence: the nh / nkv query heads sharing a KV head attend as that head's
        # queries (no GQA expansion of K/V); mask [B, 1, 1, Lmax] hides each row's padding
        qb = (q if g.tok is None else q.index_select(0, g.tok)).view(b, nkv, nh // nkv, d)
        # reshape: CUDA's SDPA kernels return a non-contiguous output (on CPU this is a view)
        return F.scaled_dot_product_attention(qb, k, v, attn_mask=g.mask).reshape(b, nh, d)
    qb = q.index_select(0, g.qidx.reshape(-1)).view(b, -1, nh, d).transpose(1, 2)  # [B, nh, nmax, D]
    out = F.scaled_dot_product_attention(qb, k, v, attn_mask=g.mask, enable_gqa=True)
    return out.transpose(1, 2)[g.qvalid]  # [Nq, nh, D]


class StepWeights:
    """Weights laid out for the engine step, built from the model's own parameters: each layer's q, k
    and v projections stacked into one [(nh + 2 nkv) D, H] matrix (one GEMM instead of three). Rebuilt
    whenever the model's weights change (the engine does so after every weight load)."""

    def __init__(self, model: MoEForCausalLM) -> None:
        with torch.no_grad():
            self.qkv = [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
                        for a in (layer.self_attn for layer in model.model.layers)]


@torch.inference_mode()
def paged_forward(model: MoEForCausalLM, pool: SlotPool, segs: list[Segment], capture: bool = True,
                  weights: StepWeights | None = None):
    """Returns (logits [num want_logits, V] float32 in segment order, rows [T, moe_layers, k] or None,
    new_slots [T]) where T = all new tokens in segment order; all three on the host. `capture=False`
    skips collecting the rows (the routers choose their experts either way). `weights`: the model's
    `StepWeights` (built here when not given; the engine keeps one per weight version).
    Decode segments (one new token) attend together in one SDPA call, prefill chunks in another (kept
    apart so single-token queries are not padded to the longest chunk)."""
    cfg, device = model.config, pool.k.device
    weights = weights or StepWeights(model)
    ids = torch.tensor([t for s in segs for t in s.ids]).to(device, non_blocking=True)
    pos = torch.from_numpy(np.concatenate([np.arange(s.start, s.start + len(s.ids)) for s in segs]))
    new_slots = torch.from_numpy(np.concatenate([s.slots[s.start:] for s in segs]))
    new_slots_dev = new_slots.to(device, non_blocking=True)
    offsets = np.cumsum([0] + [len(s.ids) for s in segs]).tolist()
    groups = []
    for members in ([i for i, s in enumerate(segs) if len(s.ids) == 1], [i for i, s in enumerate(segs) if len(s.ids) > 1]):
        if members:
            groups.append(_group([segs[i] for i in members], [offsets[i] for i in members], offsets[-1], device))

    x = model.model.embed_tokens(ids)  # [T, H]
    cos, sin = rope_cos_sin(pos.to(device), cfg.head_dim, cfg.rope_theta, x.dtype)  # [T, D]
    with _attention_kernels(device):
        x = _layers(model, weights, pool, x, cos, sin, new_slots_dev, groups)
    last = torch.tensor([offsets[i + 1] - 1 for i, s in enumerate(segs) if s.want_logits], dtype=torch.long)
    logits = linear(model.model.norm(x.index_select(0, last.to(device))), model.lm_head.weight).float().cpu()
    hook = model.routing_replay
    rows = hook.selected_rows().cpu() if hook is not None and capture else None
    return logits, rows, new_slots


def _attention_kernels(device: torch.device):
    """On CUDA, SDPA's cuDNN backend builds a graph per new shape (every step's [B, Lmax] is new: ~50 ms
    each, measured on an H100); the memory-efficient kernel takes any shape and a boolean mask."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _layers(model: MoEForCausalLM, weights: StepWeights, pool: SlotPool, x, cos, sin, new_slots,
            groups: list[_Group]) -> torch.Tensor:
    """x [T, H]: the step's tokens through every layer (the model's own norms, router and experts)."""
    cfg = model.config
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    t = x.shape[0]
    for li, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        qkv = linear(layer.input_layernorm(x), weights.qkv[li]).view(t, nh + 2 * nkv, d)
        qk = torch.cat((attn.q_norm(qkv[:, :nh]), attn.k_norm(qkv[:, nh:nh + nkv])), dim=1)
        qk = apply_rope(qk, cos, sin)  # q and k together: [T, nh + nkv, D] with cos / sin [T, D]
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]
        pool.k[li].index_copy_(0, new_slots, k)
        pool.v[li].index_copy_(0, new_slots, v)
        if groups[0].tok is None:  # a decode-only step (then the only group): no scatter
            out = _attend(q, pool.k[li], pool.v[li], groups[0])
        else:
            out = torch.empty(t, nh, d, dtype=q.dtype, device=x.device)  # [T, nh, D]
            for g in groups:
                out.index_copy_(0, g.tok, _attend(q, pool.k[li], pool.v[li], g))
        x = x + linear(out.reshape(t, nh * d), attn.o_proj.weight)
        x = x + layer.mlp(layer.post_attention_layernorm(x)[None])[0]
    return x
