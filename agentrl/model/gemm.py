"""`linear(x, w) = x @ w.T` for the model's float32 matrices on CPU, optionally through oneDNN (faster here).

Owns: the choice of GEMM library for the model's projections (attention, experts, router, LM head) in
the learner and the engine. PyTorch sends a float32 `F.linear` on CPU to MKL, and MKL runs its AVX2
kernels on AMD processors (its AVX-512 ones are Intel-only): ~100 GFLOP/s on one core of this
project's 2-core AMD EPYC, where oneDNN's AVX-512 kernels (PyTorch's `mkldnn` ops, built into every
CPU wheel) reach ~210 (`python benchmarks/gemm.py`). With the path on, a large float32 product on CPU runs
as `torch.ops.mkldnn._linear_pointwise`, in the forward and in both GEMMs of the backward:

    y  = x W^T          (forward)
    dx = dy W           (backward, the input's gradient)
    dW = dy^T x         (backward, the weight's gradient)

Exact float32 arithmetic either way (no reduced-precision "fpmath" mode); only the summation order
inside a dot product differs, as between any two BLAS builds. Everything else goes to `F.linear`:
other dtypes (bf16 already runs on oneDNN), other devices, autocast, small products (oneDNN's ~15 us
per call loses below ~2M multiply-adds, ~4M with autograd), and tensors that need a bias or double backward.

oneDNN compiles a kernel for every new shape (~0.5 ms), and the number of rows M changes with every
batch (tokens per expert, sequences per step). So the forward rounds M up to one of 8 sizes per
octave (at most 12.5% more rows of x, zero-filled and cut off again), the backward runs the largest
such size on oneDNN and the remaining rows on MKL (no copy of the wide dy), and oneDNN's kernel
cache is raised from 1,024 to 4,096 shapes (when the path is on); a long run then compiles a few
hundred kernels once.

Opt-in: `AGENTRL_CPU_GEMM=onednn` (read at import; Ray actors inherit it from the driver). The default
is `torch` (F.linear): with oneDNN the quickstart's warm-up, the same arithmetic summed in another
order, ended at a model from which RL did not improve (README, Benchmarks, `benchmarks/gemm.py`).
Does not own: the model (modeling.py), which calls `linear` for its bias-free projections.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

MIN_MACS = 1 << 21  # M * K * N below this: F.linear (MKL) is as fast or faster (oneDNN's fixed cost)
MIN_MACS_GRAD = 1 << 22  # the same with autograd (three GEMMs, and the Function's own cost)
_BACKEND = os.environ.get("AGENTRL_CPU_GEMM", "torch")
if _BACKEND not in ("onednn", "torch"):
    raise ValueError(f"AGENTRL_CPU_GEMM={_BACKEND!r}: use 'torch' (default) or 'onednn'")
_op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
AVAILABLE = _op is not None and torch.backends.mkldnn.is_available()  # this torch build has oneDNN's linear op
ENABLED = False


def enable(on: bool = True) -> None:
    """Turn the path on or off in this process (`AGENTRL_CPU_GEMM` does it at import)."""
    global ENABLED
    ENABLED = on and AVAILABLE
    if ENABLED:  # oneDNN reads it when it builds its kernel cache (on first use); a user's own setting wins
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")


enable(_BACKEND == "onednn")


def bucket(m: int) -> int:
    """Rows rounded up to a cached kernel size: multiples of 16 up to 64, then 8 sizes per octave."""
    if m <= 64:
        return (m + 15) // 16 * 16
    step = 1 << (m.bit_length() - 4)  # 2^(floor(log2 m) - 3)
    return (m + step - 1) // step * step


def bucket_floor(m: int) -> int:
    """The largest kernel size <= m (0 below 16)."""
    if m < 64:
        return m // 16 * 16
    step = 1 << (m.bit_length() - 4)
    return m // step * step


def _pad(a: torch.Tensor, rows: int) -> torch.Tensor:
    if a.shape[0] == rows:
        return a
    out = a.new_empty((rows,) + tuple(a.shape[1:]))
    out[: a.shape[0]] = a
    out[a.shape[0]:] = 0
    return out


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b[N, K]^T on oneDNN (any strides)."""
    return _op(a, b, None, "none", [], "")


def _forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] padded to a kernel size (a copy of x, the narrow side), the extra rows cut off (a view)."""
    m = x.shape[0]
    return _mm_t(_pad(x, bucket(m)), w)[:m]


class _Linear(torch.autograd.Function):
    """The backward splits the rows at the largest kernel size instead of padding dy (wide) again:
    oneDNN for the first `bucket_floor(M)` rows, MKL for the rest (under 1/8 of them)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # x [M, K], w [N, K]
        ctx.save_for_backward(x, w)
        return _forward(x, w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        f = bucket_floor(dy.shape[0])
        if f == 0:  # too few rows for a kernel size (large K x N): MKL throughout
            return (dy @ w if ctx.needs_input_grad[0] else None), (dy.t() @ x if ctx.needs_input_grad[1] else None)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dx = dy W
            dx = _mm_t(dy[:f], w.t())
            if f < dy.shape[0]:
                dx = torch.cat([dx, dy[f:] @ w])
        if ctx.needs_input_grad[1]:  # dW = dy^T x, a sum over rows
            dw = _mm_t(dy[:f].t(), x[:f].t())
            if f < dy.shape[0]:
                dw += dy[f:].t() @ x[f:]
        return dx, dw


def use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear(x, w)` runs on oneDNN (see the module docstring for the rule)."""
    return (ENABLED and x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
            and w.device.type == "cpu" and w.dim() == 2 and x.shape[-1] == w.shape[1]
            and not torch.is_autocast_enabled("cpu")
            and x.numel() * w.shape[0] >= (MIN_MACS_GRAD if _needs_grad(x, w) else MIN_MACS))


def _needs_grad(x: torch.Tensor, w: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T -> [..., N]: `F.linear(x, w)`, on oneDNN for large float32 CPU products."""
    if not use_onednn(x, w):
        return F.linear(x, w)
    x2 = x.reshape(-1, x.shape[-1])
    y = _Linear.apply(x2, w) if _needs_grad(x, w) else _forward(x2, w)
    return y.view(*x.shape[:-1], w.shape[0])
