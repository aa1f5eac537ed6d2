"""Weights between agentrl's HF names (Qwen3-MoE, fused experts) and megatron-core's GPTModel names.

Owns: `hf_to_mcore` and `mcore_to_hf`, exact inverses of each other, for a whole (unsharded) model.
Does not own: building the model (model.py) or files on disk (agentrl.model.checkpoint).

    HF (in memory, agentrl / transformers 5.x)           megatron-core local spec
    model.embed_tokens.weight                             embedding.word_embeddings.weight
    model.layers.i.input_layernorm.weight                 decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight          decoder.layers.i.self_attention.linear_qkv.weight
    model.layers.i.self_attn.o_proj.weight                decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.self_attn.{q,k}_norm.weight            decoder.layers.i.self_attention.{q,k}_layernorm.weight
    model.layers.i.post_attention_layernorm.weight        decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.gate.weight                        decoder.layers.i.mlp.router.weight
    model.layers.i.mlp.gate.e_score_correction_bias       decoder.layers.i.mlp.router.expert_bias
    model.layers.i.mlp.experts.gate_up_proj [E, 2I, H]    ...mlp.experts.local_experts.e.linear_fc1.weight [2I, H]
    model.layers.i.mlp.experts.down_proj [E, H, I]        ...mlp.experts.local_experts.e.linear_fc2.weight [H, I]
    model.layers.i.mlp.shared_experts.{gate,up,down}_proj ...mlp.shared_experts.linear_fc{1,2}.weight
    model.layers.i.mlp.{gate,up,down}_proj (dense layer)  ...mlp.linear_fc{1,2}.weight
    model.norm.weight                                     decoder.final_layernorm.weight
    lm_head.weight                                        output_layer.weight (absent when tied)

linear_qkv groups heads by KV head (GQA): for each of the G = num_key_value_heads groups, its
H/G query heads, then its key head, then its value head, each head_dim rows. SwiGLU fc1 is
cat(gate, up) along the output dim, which is exactly agentrl's fused `gate_up_proj[e]`.
Expert parallelism: rank r of an expert-parallel group of size P holds experts
[r E/P, (r+1) E/P) under local numbers 0 .. E/P - 1 (`shard_experts` / `merge_expert_shards`);
every other tensor, the router included, is whole on every rank.
Pipeline parallelism: stage r of P owns layers [r N/P, (r+1) N/P) under local numbers (megatron's
even split), the first stage the embedding, the last the final norm and output layer
(`shard_stage` / `merge_stage_shards`).
Tensor parallelism (`shard_tensor_parallel` / `merge_tensor_parallel_shards`), rank r of T:
  column-parallel (split the output dim, dim 0, into T contiguous blocks): linear_qkv (its rows are
    grouped by KV group, so rank r gets KV groups [r G/T, (r+1) G/T) with their query heads),
    the word embedding and the output layer (vocab-parallel: rows [r V/T, (r+1) V/T));
  gated column-parallel: linear_fc1 of dense MLPs and shared experts is cat(gate, up) whole but
    cat(gate_r, up_r) on rank r (each of gate and up split in T blocks);
  row-parallel (split the input dim, dim 1): linear_proj and those linear_fc2;
  replicated: norms (q/k layernorms included), the router and its expert bias, and the routed
    experts: model.py sets expert_tensor_parallel_size=1 (see there why).
"""

from __future__ import annotations

import re

import torch

from agentrl.model.config import MoEConfig

_ATTN = {"o_proj": "linear_proj", "q_norm": "q_layernorm", "k_norm": "k_layernorm"}
_NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "pre_mlp_layernorm"}


def _qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    g, d, h = cfg.num_key_value_heads, cfg.head_dim, q.shape[1]
    return torch.cat([q.reshape(g, -1, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1).reshape(-1, h)


def _qkv_split(w: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d, h = cfg.num_key_value_heads, cfg.head_dim, w.shape[1]
    per_group = cfg.num_attention_heads // g * d
    q, k, v = w.reshape(g, per_group + 2 * d, h).split([per_group, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def hf_to_mcore(state: dict[str, torch.Tensor], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """agentrl / HF state dict (fused experts) -> megatron-core GPTModel state dict."""
    out = {"embedding.word_embeddings.weight": state["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": state["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        a = src + "self_attn."
        out[dst + "self_attention.linear_qkv.weight"] = _qkv_fuse(
            state[a + "q_proj.weight"], state[a + "k_proj.weight"], state[a + "v_proj.weight"], cfg)
        for ours, theirs in _ATTN.items():
            out[dst + f"self_attention.{theirs}.weight"] = state[a + f"{ours}.weight"]
        for ours, theirs in _NORMS.items():
            out[dst + f"{theirs}.weight"] = state[src + f"{ours}.weight"]
        m, mo = src + "mlp.", dst + "mlp."
        if not cfg.is_moe_layer(i):
            out[mo + "linear_fc1.weight"] = torch.cat([state[m + "gate_proj.weight"], state[m + "up_proj.weight"]])
            out[mo + "linear_fc2.weight"] = state[m + "down_proj.weight"]
            continue
        out[mo + "router.weight"] = state[m + "gate.weight"]
        if cfg.router_selection_bias:
            out[mo + "router.expert_bias"] = state[m + "gate.e_score_correction_bias"]
        gate_up, down = state[m + "experts.gate_up_proj"], state[m + "experts.down_proj"]
        for e in range(cfg.num_experts):
            out[mo + f"experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]
            out[mo + f"experts.local_experts.{e}.linear_fc2.weight"] = down[e]
        if cfg.n_shared_experts:
            s = m + "shared_experts."
            out[mo + "shared_experts.linear_fc1.weight"] = torch.cat(
                [state[s + "gate_proj.weight"], state[s + "up_proj.weight"]])
            out[mo + "shared_experts.linear_fc2.weight"] = state[s + "down_proj.weight"]
    return out


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def mcore_to_hf(state: dict[str, torch.Tensor], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """megatron-core GPTModel state dict -> agentrl / HF state dict (fused experts); `_extra_state`
    entries (Transformer Engine bookkeeping, None here) are dropped."""
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    head = "embedding.word_embeddings.weight" if cfg.tie_word_embeddings else "output_layer.weight"
    out["lm_head.weight"] = state[head]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        a = dst + "self_attn."
        q, k, v = _qkv_split(state[src + "self_attention.linear_qkv.weight"], cfg)
        out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = q, k, v
        for ours, theirs in _ATTN.items():
            out[a + f"{ours}.weight"] = state[src + f"self_attention.{theirs}.weight"]
        for ours, theirs in _NORMS.items():
            out[dst + f"{ours}.weight"] = state[src + f"{theirs}.weight"]
        m, mo = dst + "mlp.", src + "mlp."
        if not cfg.is_moe_layer(i):
            out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = state[mo + "linear_fc1.weight"].chunk(2)
            out[m + "down_proj.weight"] = state[mo + "linear_fc2.weight"]
            continue
        out[m + "gate.weight"] = state[mo + "router.weight"]
        if cfg.router_selection_bias:
            out[m + "gate.e_score_correction_bias"] = state[mo + "router.expert_bias"]
        experts = [mo + f"experts.local_experts.{e}." for e in range(cfg.num_experts)]
        out[m + "experts.gate_up_proj"] = torch.stack([state[p + "linear_fc1.weight"] for p in experts])
        out[m + "experts.down_proj"] = torch.stack([state[p + "linear_fc2.weight"] for p in experts])
        if cfg.n_shared_experts:
            s = m + "shared_experts."
            fc1 = state[mo + "shared_experts.linear_fc1.weight"]
            out[s + "gate_proj.weight"], out[s + "up_proj.weight"] = fc1.chunk(2)
            out[s + "down_proj.weight"] = state[mo + "shared_experts.linear_fc2.weight"]
    return out


_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def expert_range(cfg: MoEConfig, rank: int, size: int) -> range:
    """The global expert ids that expert-parallel rank `rank` of `size` holds."""
    if cfg.num_experts % size:
        raise ValueError(f"num_experts={cfg.num_experts} is not divisible by expert parallel size {size}")
    per = cfg.num_experts // size
    return range(rank * per, (rank + 1) * per)


def shard_experts(state: dict[str, torch.Tensor], cfg: MoEConfig, rank: int, size: int) -> dict[str, torch.Tensor]:
    """A whole megatron state dict -> the part expert-parallel rank `rank` holds (local expert numbers)."""
    mine = expert_range(cfg, rank, size)
    out = {}
    for k, v in state.items():
        m = _EXPERT.match(k)
        if m is None:
            out[k] = v
        elif int(m.group(2)) in mine:
            out[f"{m.group(1)}{int(m.group(2)) - mine.start}{m.group(3)}"] = v
    return out


def merge_expert_shards(shards: list[dict[str, torch.Tensor]], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The state dicts of all ranks of an expert-parallel group, in rank order -> the whole state dict."""
    out = {}
    for rank, shard in enumerate(shards):
        start = expert_range(cfg, rank, len(shards)).start
        for k, v in shard.items():
            m = _EXPERT.match(k)
            if m is None:
                out.setdefault(k, v)
            else:
                out[f"{m.group(1)}{int(m.group(2)) + start}{m.group(3)}"] = v
    return out


def stage_layers(cfg: MoEConfig, rank: int, size: int) -> range:
    """The global layer indices pipeline stage `rank` of `size` owns (megatron's even split)."""
    if cfg.num_hidden_layers % size:
        raise ValueError(f"num_hidden_layers={cfg.num_hidden_layers} is not divisible by pipeline size {size}")
    per = cfg.num_hidden_layers // size
    return range(rank * per, (rank + 1) * per)


def shard_stage(state: dict[str, torch.Tensor], cfg: MoEConfig, rank: int, size: int) -> dict[str, torch.Tensor]:
    """A whole megatron state dict -> what pipeline stage `rank` holds (local layer numbers)."""
    if cfg.tie_word_embeddings and size > 1:
        raise NotImplementedError("tied embeddings under pipeline parallelism are not converted")
    mine, out = stage_layers(cfg, rank, size), {}
    for k, v in state.items():
        m = _LAYER.match(k)
        if m is not None:
            if int(m.group(1)) in mine:
                out[f"decoder.layers.{int(m.group(1)) - mine.start}.{m.group(2)}"] = v
        elif k.startswith("embedding.") and rank == 0 or not k.startswith("embedding.") and rank == size - 1:
            out[k] = v
    return out


def merge_stage_shards(shards: list[dict[str, torch.Tensor]], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The state dicts of all pipeline stages, in stage order -> the whole state dict."""
    out = {}
    for rank, shard in enumerate(shards):
        start = stage_layers(cfg, rank, len(shards)).start
        for k, v in shard.items():
            m = _LAYER.match(k)
            out[f"decoder.layers.{int(m.group(1)) + start}.{m.group(2)}" if m else k] = v
    return out


def _tp_rule(key: str) -> str:
    """How megatron splits a tensor over tensor-parallel ranks: "rows", "cols", "gated" or "whole"."""
    if key in ("embedding.word_embeddings.weight", "output_layer.weight") or key.endswith("linear_qkv.weight"):
        return "rows"
    if ".local_experts." in key:
        return "whole"
    if key.endswith("linear_fc1.weight"):
        return "gated"
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "cols"
    return "whole"


def _check_tp(cfg: MoEConfig, size: int) -> None:
    for what, n in (("vocab_size", cfg.vocab_size), ("num_key_value_heads", cfg.num_key_value_heads),
                    ("intermediate_size", cfg.intermediate_size),
                    ("shared expert size", cfg.moe_intermediate_size * cfg.n_shared_experts)):
        if n % size:
            raise ValueError(f"{what}={n} is not divisible by tensor parallel size {size}")


def shard_tensor_parallel(state: dict[str, torch.Tensor], cfg: MoEConfig, rank: int,
                          size: int) -> dict[str, torch.Tensor]:
    """A whole megatron state dict -> the slices tensor-parallel rank `rank` of `size` holds."""
    _check_tp(cfg, size)
    out = {}
    for k, v in state.items():
        rule = _tp_rule(k)
        if rule == "rows":
            out[k] = v.chunk(size, dim=0)[rank]
        elif rule == "cols":
            out[k] = v.chunk(size, dim=1)[rank]
        elif rule == "gated":
            gate, up = v.chunk(2, dim=0)
            out[k] = torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])
        else:
            out[k] = v
    return out


def merge_tensor_parallel_shards(shards: list[dict[str, torch.Tensor]], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The state dicts of all ranks of a tensor-parallel group, in rank order -> the whole state dict."""
    out = {}
    for k, v in shards[0].items():
        parts = [shard[k] for shard in shards]
        rule = _tp_rule(k)
        if rule == "rows":
            out[k] = torch.cat(parts, dim=0)
        elif rule == "cols":
            out[k] = torch.cat(parts, dim=1)
        elif rule == "gated":
            halves = [p.chunk(2, dim=0) for p in parts]
            out[k] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            out[k] = v
    return out
