"""Model config: a typed mirror of transformers' `Qwen3MoeConfig`, plus agentrl's router variants.

Owns: the config dataclass, its `config.json` form (the HF layout, so transformers and SGLang read
it), and the named presets (`tiny-moe`, `tiny-dense`, `small-moe`, `small-dense`, `tiny-moe-sigmoid`).
Does not own: weights (modeling.py) or files on disk (checkpoint.py).

Field names are transformers' own, so `MoEConfig.from_hf_dict(json.load(...))` reads a real
Qwen3-MoE `config.json` and `to_hf_dict()` writes one. The router variants (DeepSeek-V3-style
sigmoid scores with an aux-loss-free selection bias, shared experts) are not part of Qwen3-MoE; a
config that uses them is written with `model_type: "agentrl_moe"` so that transformers refuses it
("unrecognized model type") instead of silently loading a different model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

QWEN3_MOE = "qwen3_moe"
AGENTRL_MOE = "agentrl_moe"


@dataclass
class MoEConfig:
    """Architecture hyper-parameters (names and meaning as in transformers' Qwen3MoeConfig)."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 512  # width of dense (non-MoE) MLP layers
    moe_intermediate_size: int = 256  # width of each routed expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA: query heads share K/V heads
    head_dim: int = 32
    num_experts: int = 8  # 0 makes every layer dense
    num_experts_per_tok: int = 2  # top-k
    norm_topk_prob: bool = True  # renormalise the k gate weights to sum to 1
    decoder_sparse_step: int = 1  # layer i is MoE iff (i + 1) % step == 0 and i not in mlp_only_layers
    mlp_only_layers: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.001
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # ---- agentrl router variants (not in Qwen3-MoE; any non-default value makes model_type agentrl_moe)
    router_scoring: Literal["softmax", "sigmoid"] = "softmax"  # sigmoid = DeepSeek-V3 style
    router_selection_bias: bool = False  # aux-loss-free balancing bias, added for selection only
    routed_scaling_factor: float = 1.0  # multiplies the k gate weights (DeepSeek-V3)
    n_shared_experts: int = 0  # always-on experts, each of width moe_intermediate_size

    def __post_init__(self) -> None:
        self.mlp_only_layers = [int(i) for i in self.mlp_only_layers]
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            problems.append("num_experts_per_tok must be in [1, num_experts]")
        if self.num_experts > 65535:
            problems.append("num_experts must fit uint16 routing rows (<= 65535)")
        if self.decoder_sparse_step < 1:
            problems.append("decoder_sparse_step must be >= 1")
        if self.router_scoring not in ("softmax", "sigmoid"):
            problems.append(f"router_scoring must be 'softmax' or 'sigmoid', got {self.router_scoring!r}")
        if self.head_dim % 2:
            problems.append("head_dim must be even (RoPE rotates pairs)")
        if problems:
            raise ValueError("invalid MoEConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ layout
    def is_moe_layer(self, layer: int) -> bool:
        """transformers' Qwen3MoeDecoderLayer rule."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @property
    def is_hf_compatible(self) -> bool:
        """True when transformers' Qwen3MoeForCausalLM computes exactly this model."""
        return (
            self.router_scoring == "softmax"
            and not self.router_selection_bias
            and self.routed_scaling_factor == 1.0
            and self.n_shared_experts == 0
        )

    # ------------------------------------------------------------------ config.json
    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        variant = {k: d.pop(k) for k in _VARIANT_KEYS}
        d.pop("rope_theta")
        d.update(
            architectures=["Qwen3MoeForCausalLM"],
            model_type=QWEN3_MOE,
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            use_sliding_window=False,
            sliding_window=None,
            output_router_logits=False,
            use_cache=True,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
            rope_theta=self.rope_theta,  # older readers (SGLang's config path) look here
            torch_dtype="float32",
        )
        if not self.is_hf_compatible:
            d["architectures"] = ["AgentRLMoeForCausalLM"]
            d["model_type"] = AGENTRL_MOE
            d.update(variant)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> MoEConfig:
        """Read a Qwen3-MoE (or agentrl_moe) config.json dict; unknown HF bookkeeping keys are ignored,
        but architecture features we do not implement are refused."""
        model_type = d.get("model_type", QWEN3_MOE)
        if model_type not in (QWEN3_MOE, AGENTRL_MOE):
            raise ValueError(f"agentrl's model implements qwen3_moe, got model_type={model_type!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (only silu)")
        if d.get("attention_bias"):
            raise ValueError("attention_bias=true is not supported")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope.get('rope_type')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if "head_dim" not in d or d["head_dim"] is None:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if "num_experts" not in d and "num_local_experts" in d:
            kw["num_experts"] = d["num_local_experts"]
        if model_type == QWEN3_MOE:
            for k in _VARIANT_KEYS:
                kw.pop(k, None)
        for k in ("eos_token_id", "bos_token_id"):
            if isinstance(kw.get(k), list):  # HF allows a list of eos ids; keep the first as canonical
                kw[k] = kw[k][0]
        return cls(**kw)

    def replace(self, **changes: Any) -> MoEConfig:
        return dataclasses.replace(self, **changes)


_VARIANT_KEYS = ("router_scoring", "router_selection_bias", "routed_scaling_factor", "n_shared_experts")

# Presets. Parameter counts are with the default 512-token vocabulary (see `count_parameters`).
_TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, intermediate_size=512)
_SMALL = dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
              num_experts=16, num_experts_per_tok=2, moe_intermediate_size=384, intermediate_size=768)

# Presets. Parameter counts are with the default 512-token vocabulary (README table).
# A dense twin's MLP width equals its MoE's active expert width (top_k x moe_intermediate_size).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-moe": _TINY,  # ~3.5M params, 4 MoE layers, 8 experts top-2: the CI / quickstart model
    "tiny-dense": {**_TINY, "num_experts": 0},
    # DeepSeek-V3-style router variant: sigmoid scores, selection bias, one shared expert
    "tiny-moe-sigmoid": {**_TINY, "router_scoring": "sigmoid", "router_selection_bias": True, "n_shared_experts": 1},
    "small-moe": _SMALL,  # ~39M params, 8 layers, 16 experts top-2: the R3 study model
    "small-dense": {**_SMALL, "num_experts": 0},
}


def preset(name: str, **overrides: Any) -> MoEConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return MoEConfig(**{**PRESETS[name], **overrides})
