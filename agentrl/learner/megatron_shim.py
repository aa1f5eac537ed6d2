"""Compatibility shim for megatron-core 0.16.1 (pinned in pyproject.toml): CPU patches, applied only
without a GPU, and two fixes for megatron-core without Transformer Engine, applied everywhere.

Owns: `apply_cpu_shim()`, which patches the few places where megatron-core hard-codes CUDA so that
a GPTModel built from the local (no Transformer Engine / Apex) spec runs forward, backward and
AdamW on CPU with a gloo process group, and always applies `_fix_without_te()`. Does not own: model
building or training (agentrl/learner/mcore/). With a GPU present only items 7 and 8 apply.

The upstream lines it works around (megatron/core/..., version 0.16.1); CPU only:
  1. models/common/embeddings/rotary_pos_embedding.py:162  `RotaryEmbedding.get_emb` moves
     `inv_freq` to `torch.cuda.current_device()`;
  2. transformer/moe/router.py:90-92  `Router.gating` moves the router weight / bias to
     `torch.cuda.current_device()`, and router.py:169/178 `TopKRouter.__init__` allocates the
     expert-bias buffers there (sigmoid routers with a selection bias);
  3. utils.py:631  `GlobalMemoryBuffer.get_tensor` allocates the attention score buffer on
     `torch.cuda.current_device()`;
  4. tensor_parallel/mappings.py:91/141/148/181  `_gather_along_last_dim`,
     `_gather_along_first_dim`, `_reduce_scatter_along_first_dim` allocate the outputs of
     collectives there (expert parallelism over several gloo processes);
     (1-4: the wrapped function runs with `torch.cuda.current_device` answering "cpu", for the
     duration of that call only)
  5. transformer/utils.py:35  `get_default_causal_mask` builds the mask with `device="cuda"`
     (imported by name into fusions/fused_softmax.py:8, which is where it is replaced);
  6. tensor_parallel/random.py:250  `CudaRNGStatesTracker.fork` (used around attention dropout in
     transformer/dot_product_attention.py) reads the CUDA RNG state: the tracker is re-created as
     megatron's own inference tracker, whose `fork` is a no-op (dropout is 0 in our configs);
CPU and GPU (found on a lent H100, where items 1-6 do not apply):
  7. transformer/moe/moe_utils.py:1192  `router_gating_linear` reads the name `te_general_gemm`,
     which is only bound when Transformer Engine imports: it is bound to None;
  8. moe_utils.py:1196/1235  `RouterGatingLinearFunction` (a custom autograd function) computes its
     forward `mm` under the caller's `torch.autocast`, so it returns bfloat16, and its backward
     multiplies that bfloat16 gradient with the `router_dtype` weight: a dtype error in every bf16
     (autocast) backward. router.py:100 calls it with autocast off, so the router computes in its
     `router_dtype` (the input's dtype: float32 under our autocast), as megatron intends.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_applied = False


@contextlib.contextmanager
def _cpu_as_current_device():
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = original


def _on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_as_current_device():
            return fn(*args, **kwargs)

    wrapper._agentrl_cpu_shim = True
    return wrapper


def _causal_mask_cpu(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def apply_cpu_shim() -> bool:
    """Patch megatron-core for CPU if (and only if) no GPU is available, and fix items 7-8 of the
    module docstring in any case. Idempotent. Returns True when the CPU patches are active."""
    global _applied
    _fix_without_te()
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core import utils as mcore_utils
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import Router, TopKRouter

    for owner, name in ((RotaryEmbedding, "get_emb"), (Router, "gating"), (TopKRouter, "__init__"),
                        (mcore_utils.GlobalMemoryBuffer, "get_tensor"), (mappings, "_gather_along_last_dim"),
                        (mappings, "_gather_along_first_dim"), (mappings, "_reduce_scatter_along_first_dim")):
        fn = getattr(owner, name)
        if not getattr(fn, "_agentrl_cpu_shim", False):
            setattr(owner, name, _on_cpu(fn))
    fused_softmax.get_default_causal_mask = _causal_mask_cpu
    mcore_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    _applied = True
    return True


def _fix_without_te() -> None:
    """Items 7 and 8 of the module docstring. Idempotent."""
    from megatron.core.transformer.moe import moe_utils, router

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if not getattr(router.router_gating_linear, "_agentrl_no_autocast", False):
        router.router_gating_linear = _outside_autocast(router.router_gating_linear)


def _outside_autocast(fn):
    @functools.wraps(fn)
    def wrapper(inp, *args, **kwargs):
        with torch.autocast(inp.device.type, enabled=False):
            return fn(inp, *args, **kwargs)

    wrapper._agentrl_no_autocast = True
    return wrapper
