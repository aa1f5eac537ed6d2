"""A megatron-core GPTModel built from agentrl's `MoEConfig`, and the process groups it needs.

Owns: `check_supported` (which MoEConfig variants megatron-core computes exactly, with a clear error
for the rest), `transformer_config` (MoEConfig -> megatron's TransformerConfig), `init_parallel`
(gloo process group + megatron's model-parallel state), `build_gpt` (GPTModel from the local spec:
no Transformer Engine, no Apex) and `McoreCausalLM`, which wraps the GPTModel so the rest of agentrl
sees a model with HF parameter names (`config`, `state_dict`, `load_state_dict`) and our batch
layouts (`forward(input_ids, attention_mask=, segment_ids=)`).
Does not own: weight-name conversion (convert.py), routing replay (replay.py), training (learner.py).

Layouts. megatron-core's local attention takes a boolean mask (True = masked) and applies RoPE by
row offset (it ignores position ids). A padded batch is right-padded, so row offsets are the
positions; a packed row gets a block-diagonal causal mask, and since RoPE attention depends only on
the distance between query and key, restarting positions per segment changes nothing.
Hidden states inside megatron are sequence-first `[S, B, H]`; routers see tokens in that order.

Parallelism (McoreParallel). Expert parallel: each rank holds E/P experts, `load_state_dict` keeps
this rank's, `state_dict` gathers them. Pipeline parallel: each stage holds its layers (embedding
on the first, LM head on the last); a later stage takes the previous one's output as
`stage_input`. Tensor parallel: each rank holds its slices of qkv / proj / fc1 / fc2 / vocab
(convert.py says which) and whole norms, routers and routed experts; logits come back gathered over
the vocab. Routed experts are whole because expert_tensor_parallel_size is set to 1: megatron's
default (= the tensor-parallel size, model_parallel_config.py:413) is exact in the forward but,
without sequence parallel, multiplies expert gradients by TP (2x measured at TP=2): the allgather
dispatcher gathers the (identical) tokens of every TP rank (moe/token_dispatcher.py:265-275), so each
token passes every expert shard TP times, and the reduce-scatter's backward hands each copy the full
output gradient. With size 1 each TP rank runs its experts whole on its own (whole) tokens. The q/k
layernorms see only a rank's heads, so their gradients are partial per rank and must be summed over
TP (as megatron/core/distributed/finalize_model_grads.py:355 does). All three are exercised over 2
gloo processes in tests/test_megatron.py; training with them (schedules, gradient sync) is not wired
into MegatronLearner, which runs world size 1. Sequence parallel stays off: it needs Transformer
Engine or Apex norms (megatron/core/transformer/torch_norm.py:32 refuses it), and without it
megatron refuses to *train* an MoE layer under tensor parallelism
(megatron/core/transformer/moe/moe_layer.py:379; forward in eval mode works) and wants it for
tensor x expert parallelism (model_parallel_config.py:440), so tensor x expert is refused here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from agentrl.learner.megatron_shim import apply_cpu_shim
from agentrl.model.config import MoEConfig
from agentrl.model.modeling import CausalLMOutput, build_attention_mask


@dataclass(frozen=True)
class McoreParallel:
    """Model-parallel sizes handed to megatron's `initialize_model_parallel` (world = tp * ep * pp * dp)."""

    tensor: int = 1
    expert: int = 1
    pipeline: int = 1


def check_supported(cfg: MoEConfig) -> None:
    """Raise ValueError for a config megatron-core would compute differently from MoEForCausalLM."""
    problems = []
    if cfg.router_scoring == "sigmoid" and not cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        problems.append("sigmoid routers always renormalise the top-k in megatron-core (needs norm_topk_prob=true)")
    if cfg.router_selection_bias and cfg.router_scoring != "sigmoid":
        problems.append("a selection bias (expert_bias) needs sigmoid scoring in megatron-core")
    if cfg.router_scoring == "softmax" and cfg.num_experts_per_tok == 1 and cfg.norm_topk_prob and cfg.moe_layers:
        problems.append("top-1 softmax routing needs moe_router_pre_softmax in megatron-core (norm_topk_prob=false)")
    if problems:
        raise ValueError("MoEConfig not supported by the megatron-core backend: " + "; ".join(problems))


def transformer_config(cfg: MoEConfig, parallel: McoreParallel = McoreParallel()):
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_supported(cfg)
    moe = {}
    if cfg.moe_layers:
        moe = dict(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_layer_freq=[int(cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)],
            moe_router_score_function=cfg.router_scoring,
            # softmax + renormalised top-k == softmax over the top-k logits (megatron's default order)
            moe_router_pre_softmax=cfg.router_scoring == "softmax" and not cfg.norm_topk_prob,
            moe_router_topk_scaling_factor=cfg.routed_scaling_factor if cfg.routed_scaling_factor != 1.0 else None,
            moe_router_enable_expert_bias=cfg.router_selection_bias,
            moe_shared_expert_intermediate_size=(cfg.moe_intermediate_size * cfg.n_shared_experts
                                                 if cfg.n_shared_experts else None),
            moe_router_load_balancing_type="none",  # the learner adds agentrl's aux loss on the used assignment
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="allgather",  # alltoall creates a CUDA stream at build time
            moe_router_dtype="fp32",
            moe_enable_routing_replay=True,
            moe_grouped_gemm=False,
        )
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.initializer_range,
        params_dtype=torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # weights always come from an HF checkpoint
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=parallel.tensor,
        expert_model_parallel_size=parallel.expert,
        pipeline_model_parallel_size=parallel.pipeline,
        expert_tensor_parallel_size=1,  # routed experts whole on every TP rank (module docstring)
        pipeline_dtype=torch.float32 if parallel.pipeline > 1 else None,
        **moe,
    )


def init_parallel(parallel: McoreParallel = McoreParallel()) -> None:
    """A world-size-1 gloo process group (unless the caller made one, e.g. of several processes) and
    megatron's parallel state. Idempotent."""
    from megatron.core import parallel_state

    apply_cpu_shim()
    dist = torch.distributed
    if not dist.is_initialized():  # world size 1: an in-memory store, no port to find or lose
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl", store=dist.HashStore(),
                                rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        have = McoreParallel(parallel_state.get_tensor_model_parallel_world_size(),
                             parallel_state.get_expert_model_parallel_world_size(),
                             parallel_state.get_pipeline_model_parallel_world_size())
        if have != parallel:
            raise RuntimeError(f"megatron's parallel state is already initialised as {have}, not {parallel}")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=parallel.tensor,
                                             pipeline_model_parallel_size=parallel.pipeline,
                                             expert_model_parallel_size=parallel.expert,
                                             expert_tensor_parallel_size=1)
    if torch.cuda.is_available():  # megatron's attention forks the tracker's "model-parallel-rng" on a GPU
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(0)  # dropout is 0 and weights are loaded: never drawn


def build_gpt(cfg: MoEConfig, parallel: McoreParallel = McoreParallel()):
    """A megatron-core GPTModel with agentrl's architecture (uninitialised weights: load them)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from megatron.core import parallel_state

    init_parallel(parallel)
    tcfg = transformer_config(cfg, parallel)
    if parallel.pipeline > 1 and cfg.tie_word_embeddings:
        raise NotImplementedError("tied embeddings under pipeline parallelism are not supported")
    if cfg.moe_layers:
        spec = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=False, normalization="RMSNorm")
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    before = len(RouterReplay.global_router_replay_instances)
    gpt = GPTModel(tcfg, spec, vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_position_embeddings,
                   position_embedding_type="rope", rotary_base=int(cfg.rope_theta),
                   share_embeddings_and_output_weights=cfg.tie_word_embeddings, parallel_output=False,
                   pre_process=parallel_state.is_pipeline_first_stage(),
                   post_process=parallel_state.is_pipeline_last_stage())
    # each router registered a RouterReplay in megatron's process-wide list; replay.py drives the
    # instances of this model directly, so the global list must not keep them (or this model) alive
    del RouterReplay.global_router_replay_instances[before:]
    if torch.cuda.is_available():  # megatron builds its own layers on the GPU, torch.nn norms on the host
        gpt.cuda(torch.cuda.current_device())
    return gpt


class McoreCausalLM(nn.Module):
    """A megatron-core GPTModel seen as agentrl's causal LM: HF names in `state_dict()` /
    `load_state_dict()` (what checkpoints and engines use), our batch layouts in `forward`."""

    def __init__(self, cfg: MoEConfig, parallel: McoreParallel = McoreParallel()) -> None:
        super().__init__()
        from agentrl.learner.mcore.replay import McoreRoutingReplay

        if parallel.tensor > 1 and parallel.expert > 1:
            raise NotImplementedError("tensor x expert parallelism needs sequence parallelism "
                                      "(megatron/core/model_parallel_config.py:440), which needs TE or Apex norms")
        self.config, self.parallel = cfg, parallel
        self.gpt = build_gpt(cfg, parallel)
        self.routing_replay = McoreRoutingReplay.attach(self.gpt, cfg) if cfg.moe_layers else None

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The whole model in HF names (under model parallelism, gathered from the other ranks)."""
        from megatron.core import parallel_state

        from agentrl.learner.mcore.convert import (mcore_to_hf, merge_expert_shards, merge_stage_shards,
                                                   merge_tensor_parallel_shards)

        state = {k: v for k, v in self.gpt.state_dict().items() if not k.endswith("_extra_state")}
        for size, group, merge in ((self.parallel.tensor, parallel_state.get_tensor_model_parallel_group(),
                                    merge_tensor_parallel_shards),
                                   (self.parallel.expert, parallel_state.get_expert_model_parallel_group(),
                                    merge_expert_shards),
                                   (self.parallel.pipeline, parallel_state.get_pipeline_model_parallel_group(),
                                    merge_stage_shards)):
            if size > 1:
                shards = [None] * size
                torch.distributed.all_gather_object(shards, state, group=group)
                state = merge(shards, self.config)
        return mcore_to_hf(state, self.config)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        """Load a whole HF-named state dict (this rank keeps its part under model parallelism)."""
        from megatron.core import parallel_state

        from agentrl.learner.mcore.convert import hf_to_mcore, shard_experts, shard_stage, shard_tensor_parallel

        mstate = hf_to_mcore(state, self.config)
        if self.parallel.tensor > 1:
            mstate = shard_tensor_parallel(mstate, self.config, parallel_state.get_tensor_model_parallel_rank(),
                                           self.parallel.tensor)
        if self.parallel.expert > 1:
            mstate = shard_experts(mstate, self.config, parallel_state.get_expert_model_parallel_rank(),
                                   self.parallel.expert)
        if self.parallel.pipeline > 1:
            mstate = shard_stage(mstate, self.config, parallel_state.get_pipeline_model_parallel_rank(),
                                 self.parallel.pipeline)
        missing, unexpected = self.gpt.load_state_dict(mstate, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if strict and (missing or unexpected):
            raise ValueError(f"weights do not match the megatron model: missing={missing}, unexpected={unexpected}")
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, return_aux_loss: bool = False,
                stage_input: torch.Tensor | None = None, token_weights: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B, S]; attention_mask [B, S] (1 = real, right padding); segment_ids [B, S] (packing).
        Pipeline stages after the first take the previous stage's output `stage_input` [S, B, H]; stages
        before the last return their hidden states [S, B, H] in `logits`. token_weights [B, S]: each
        position's weight in the load-balancing loss (0 = padding); default attention_mask, or 1."""
        b, s = input_ids.shape
        if stage_input is not None:
            self.gpt.set_input_tensor(stage_input.to(next(self.gpt.parameters()).device))
        dev = next(self.gpt.parameters()).device  # the GPU when there is one; inputs come from CPU
        allowed = build_attention_mask(None if attention_mask is None else attention_mask.to(dev),
                                       None if segment_ids is None else segment_ids.to(dev), s, dev)
        mask = None if allowed is None else ~allowed
        positions = torch.arange(s, device=dev).expand(b, s)
        hook = self.routing_replay
        if hook is not None:
            hook.begin_forward(b, s, keep_scores=return_aux_loss)
        logits = self.gpt(input_ids.to(dev), positions, mask)  # [B, S, V]
        aux = None
        if return_aux_loss and hook is not None:
            weights = token_weights if token_weights is not None else attention_mask
            aux = hook.aux_loss(None if weights is None else weights.reshape(-1).to(dev))
            aux = aux.to(input_ids.device)
        return CausalLMOutput(logits=logits.to(input_ids.device), aux_loss=aux)
