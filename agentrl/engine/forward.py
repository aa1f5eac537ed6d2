"""One engine step: a ragged batch of new tokens through the model over slot-addressed KV.

Owns: `paged_forward`, which runs the model's own submodules (so weights, RoPE, routing are
exactly the learner's code) on the flat list of new tokens of every scheduled request (prefill
chunks and single decode tokens together), writes their K/V into the pool, attends over each
request's slots, and returns the logits wanted plus the routing the MoE layers chose for every
new token. Does not own: which tokens are scheduled (engine.py) or sampling (sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from agentrl.engine.memory import SlotPool
from agentrl.model.modeling import MoEForCausalLM, rope_cos_sin


@dataclass
class Segment:
    """The new tokens of one request in this step."""

    ids: list[int]  # new token ids
    start: int  # position of ids[0] in the sequence (= tokens already in KV)
    slots: np.ndarray  # [start + len(ids)] int64: KV slots of the whole sequence so far, new ones last
    want_logits: bool  # does the last new token's next-token distribution get sampled


def _decode_index(segs: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of every single-token segment padded to [B, Lmax], and the [B, 1, 1, Lmax] key mask.
    Built once per step and shared by all layers."""
    lens = [len(s.slots) for s in segs]
    idx = np.zeros((len(segs), max(lens)), dtype=np.int64)
    for i, s in enumerate(segs):
        idx[i, : lens[i]] = s.slots
    mask = torch.arange(idx.shape[1])[None, :] < torch.tensor(lens)[:, None]
    return torch.from_numpy(idx), mask[:, None, None, :]


def _attend_decode(q, k_pool, v_pool, idx, mask, pos):
    """All single-token segments in one SDPA: keys gathered into a padded [B, nkv, Lmax, D] batch."""
    b, lmax = idx.shape
    flat = idx.reshape(-1)  # index_select copies rows ~6x faster than advanced indexing on CPU
    k = k_pool.index_select(0, flat).view(b, lmax, *k_pool.shape[1:]).transpose(1, 2)  # [B, nkv, Lmax, D]
    v = v_pool.index_select(0, flat).view(b, lmax, *v_pool.shape[1:]).transpose(1, 2)
    qb = q[0, :, pos].transpose(0, 1)[:, :, None]  # [B, nh, 1, D]
    out = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, enable_gqa=True)
    return out[:, :, 0]  # [B, nh, D]


def _attend_prefill(q, k_pool, v_pool, seg: Segment, lo: int, hi: int):
    """One request's chunk: queries at positions start..start+n attend causally over all its slots."""
    slots = torch.from_numpy(seg.slots)
    k = k_pool.index_select(0, slots).transpose(0, 1)[None]  # [1, nkv, L, D]
    v = v_pool.index_select(0, slots).transpose(0, 1)[None]
    n, total = hi - lo, len(seg.slots)
    qpos = torch.arange(seg.start, seg.start + n)[:, None]
    mask = torch.arange(total)[None, :] <= qpos  # [n, L]
    out = F.scaled_dot_product_attention(q[:, :, lo:hi], k, v, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)  # [n, nh, D]


@torch.inference_mode()
def paged_forward(model: MoEForCausalLM, pool: SlotPool, segs: list[Segment]):
    """Returns (logits [num want_logits, V] float32 in segment order, rows [T, moe_layers, k] or None,
    new_slots [T]) where T = all new tokens in segment order."""
    cfg = model.config
    ids = torch.tensor([t for s in segs for t in s.ids])
    pos = torch.cat([torch.arange(s.start, s.start + len(s.ids)) for s in segs])
    new_slots = torch.from_numpy(np.concatenate([s.slots[s.start:] for s in segs]))
    offsets, o = [], 0
    for s in segs:
        offsets.append((o, o + len(s.ids)))
        o += len(s.ids)
    decode = [i for i, s in enumerate(segs) if len(s.ids) == 1]
    prefill = [i for i, s in enumerate(segs) if len(s.ids) > 1]
    decode_pos = torch.tensor([offsets[i][0] for i in decode], dtype=torch.long)
    if decode:
        dec_idx, dec_mask = _decode_index([segs[i] for i in decode])

    x = model.model.embed_tokens(ids)[None]  # [1, T, H]
    cos, sin = rope_cos_sin(pos[None], cfg.head_dim, cfg.rope_theta, x.dtype)
    for li, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q, k, v = attn.qkv(layer.input_layernorm(x), cos, sin)  # q [1, nh, T, D]; k, v [1, nkv, T, D]
        pool.k[li].index_copy_(0, new_slots, k[0].transpose(0, 1))
        pool.v[li].index_copy_(0, new_slots, v[0].transpose(0, 1))
        out = torch.empty(q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype)  # [T, nh, D]
        if decode:
            out[decode_pos] = _attend_decode(q, pool.k[li], pool.v[li], dec_idx, dec_mask, decode_pos)
        for i in prefill:
            lo, hi = offsets[i]
            out[lo:hi] = _attend_prefill(q, pool.k[li], pool.v[li], segs[i], lo, hi)
        x = x + attn.o_proj(out.reshape(1, out.shape[0], -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    last = torch.tensor([offsets[i][1] - 1 for i, s in enumerate(segs) if s.want_logits], dtype=torch.long)
    logits = model.lm_head(model.model.norm(x[0, last])).float()
    hook = model.routing_replay
    rows = hook.selected_rows() if hook is not None else None
    return logits, rows, new_slots
