"""Training-inference mismatch metrics (pure torch functions).

This module owns the *diagnostic* quantities that measure how far the training
engine's policy ``pi_train`` drifts from the inference engine's policy
``pi_infer`` on the same generated tokens, and how often the two engines route
tokens to different experts. It has no state and does no I/O; every function
takes tensors and returns tensors (or, for the ``*_metrics`` helpers, a
``dict[str, float]`` ready for logging).

Conventions
-----------
* Log-prob tensors (``logp_train``, ``logp_infer``) are per generated token and
  may have any (identical) shape, e.g. ``[T]`` or ``[B, T]``; they are flattened
  together with the mask.
* ``mask`` is a bool or 0/1 tensor of the same shape; only masked-in tokens
  count, and every mean is over masked-in tokens. ``mask=None`` means all
  tokens. An empty selection gives ``0.0`` (never NaN).
* Reductions are computed in float64; tensor functions return float32.

Definitions (per token t, over masked-in tokens, n = number of them)::

    log r_t = logp_train(t) - logp_infer(t)          r_t = pi_train / pi_infer
    mismatch KL (k3)  = mean_t (r_t - 1 - log r_t)   ~ KL(pi_infer || pi_train)
    F(tau)            = mean_t 1[max(r_t, 1/r_t) > tau] = mean_t 1[|log r_t| > log tau]
    ESS(w)            = (sum w)^2 / sum w^2,   normalised ESS = ESS / n in (0, 1]

Routing disagreement compares two routings of the same tokens, given as
integer tensors ``[T, L, k]`` of top-k expert ids per token per MoE layer; sets
are compared order-insensitively (sorted along k).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "log_ratio",
    "mismatch_kl",
    "extreme_fraction",
    "ratio_extremeness",
    "routing_disagreement",
    "effective_sample_size",
    "mismatch_metrics",
    "routing_metrics",
]

_OUT_DTYPE = torch.float32


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {name_a} has shape {tuple(a.shape)}, "
            f"{name_b} has shape {tuple(b.shape)}"
        )


def _bool_mask(mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """Return a flat bool mask of ``prod(shape)`` elements."""
    if mask is None:
        return torch.ones(math.prod(shape), dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device)
    if mask.shape != shape:
        raise ValueError(
            f"shape mismatch: mask has shape {tuple(mask.shape)}, "
            f"expected {tuple(shape)}"
        )
    if mask.dtype != torch.bool:
        mask = mask != 0
    return mask.reshape(-1)


def _masked_log_ratio(logp_train: Tensor, logp_infer: Tensor, mask: Tensor | None) -> Tensor:
    """Flat float64 log r_t over masked-in tokens."""
    _check_same_shape(logp_train, logp_infer, "logp_train", "logp_infer")
    m = _bool_mask(mask, logp_train.shape, logp_train.device)
    lr = logp_train.detach().to(torch.float64) - logp_infer.detach().to(torch.float64)
    return lr.reshape(-1)[m]


def _scalar(x: float | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(x, dtype=_OUT_DTYPE, device=device)


def log_ratio(logp_train: Tensor, logp_infer: Tensor) -> Tensor:
    """Per-token log importance ratio ``log r_t = logp_train - logp_infer``.

    Shapes: ``logp_train``, ``logp_infer``: any identical shape ``S``; returns
    ``S`` (elementwise, no masking, dtype of the promoted inputs). Gradients
    flow through this function (it is a plain subtraction).
    """
    _check_same_shape(logp_train, logp_infer, "logp_train", "logp_infer")
    return logp_train - logp_infer


def mismatch_kl(logp_train: Tensor, logp_infer: Tensor, mask: Tensor | None = None) -> Tensor:
    """k3 estimate of KL(pi_infer || pi_train) from tokens sampled by pi_infer.

    ``KL_k3 = (1/n) * sum_{t in mask} (r_t - 1 - log r_t)``, with
    ``log r_t = logp_train(t) - logp_infer(t)``. Each term is >= 0 and is 0 iff
    ``r_t = 1``; it is an unbiased estimator since ``E_{pi_infer}[r] = 1``.

    Shapes: ``logp_train``, ``logp_infer``, ``mask``: any identical shape;
    returns a float32 scalar. Empty mask -> 0.0.
    """
    lr = _masked_log_ratio(logp_train, logp_infer, mask)
    if lr.numel() == 0:
        return _scalar(0.0, logp_train.device)
    # expm1(x) - x == exp(x) - 1 - x, more accurate for small |x|.
    k3 = torch.expm1(lr) - lr
    return k3.mean().to(_OUT_DTYPE)


def extreme_fraction(
    logp_train: Tensor, logp_infer: Tensor, tau: float, mask: Tensor | None = None
) -> Tensor:
    """Fraction of tokens with an extreme ratio, ``F(tau)``.

    ``F(tau) = (1/n) * sum_{t in mask} 1[max(r_t, 1/r_t) > tau]``, computed
    stably as ``1[|log r_t| > log tau]`` (strict: ``r_t == tau`` is not
    counted). Requires ``tau >= 1``.

    Shapes: inputs any identical shape; returns a float32 scalar in [0, 1].
    Empty mask -> 0.0.
    """
    if not tau >= 1.0:
        raise ValueError(f"tau must be >= 1, got {tau}")
    lr = _masked_log_ratio(logp_train, logp_infer, mask)
    if lr.numel() == 0:
        return _scalar(0.0, logp_train.device)
    return (lr.abs() > math.log(tau)).to(torch.float64).mean().to(_OUT_DTYPE)


def ratio_extremeness(logp_train: Tensor, logp_infer: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token ``max(r_t, 1/r_t) = exp(|log r_t|)`` over masked-in tokens.

    Shapes: inputs any identical shape; returns a 1-D float32 tensor ``[n]``
    (flattened, masked-in tokens only, in input order), e.g. for CDF plots.
    Values are >= 1 (may be ``inf`` in float32 for enormous ratios).
    """
    lr = _masked_log_ratio(logp_train, logp_infer, mask)
    return torch.exp(lr.abs()).to(_OUT_DTYPE)


def routing_disagreement(
    rows_a: Tensor, rows_b: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Fraction of tokens whose top-k expert *set* differs between two routings.

    ``rows_a``, ``rows_b``: integer tensors ``[T, L, k]`` (any leading shape
    ``[..., L, k]`` is accepted and flattened into tokens); ``mask``: bool/0-1
    tensor of the leading shape (``[T]``) or None.

    With ``d[t, l] = 1[sort(a[t, l]) != sort(b[t, l])]`` (order-insensitive):

    * ``per_layer[l] = (1/n) * sum_{t in mask} d[t, l]``   -> float32 ``[L]``
    * ``any_layer   = (1/n) * sum_{t in mask} max_l d[t, l]`` -> float32 scalar

    Empty mask -> zeros. Shape mismatch -> ValueError naming both shapes.
    """
    rows_a = torch.as_tensor(rows_a)
    rows_b = torch.as_tensor(rows_b, device=rows_a.device)
    _check_same_shape(rows_a, rows_b, "rows_a", "rows_b")
    if rows_a.dim() < 3:
        raise ValueError(f"routing rows must have shape [T, L, k], got {tuple(rows_a.shape)}")
    L, k = rows_a.shape[-2], rows_a.shape[-1]
    lead = rows_a.shape[:-2]
    m = _bool_mask(mask, lead, rows_a.device)
    a = torch.sort(rows_a.reshape(-1, L, k), dim=-1).values[m]
    b = torch.sort(rows_b.reshape(-1, L, k), dim=-1).values[m]
    if a.shape[0] == 0:
        return (
            torch.zeros(L, dtype=_OUT_DTYPE, device=rows_a.device),
            _scalar(0.0, rows_a.device),
        )
    diff = (a != b).any(dim=-1)  # [n, L]
    per_layer = diff.to(torch.float64).mean(dim=0).to(_OUT_DTYPE)
    any_layer = diff.any(dim=-1).to(torch.float64).mean().to(_OUT_DTYPE)
    return per_layer, any_layer


def effective_sample_size(
    weights: Tensor, mask: Tensor | None = None, normalized: bool = True
) -> Tensor:
    """Effective sample size of importance weights over masked-in tokens.

    ``ESS = (sum_t w_t)^2 / sum_t w_t^2``; with ``normalized=True`` returns
    ``ESS / n`` in (0, 1] (1 for uniform weights, 1/n for one-hot weights).
    ESS is scale-invariant in ``w``. Weights must be non-negative.

    Shapes: ``weights``, ``mask``: any identical shape; returns a float32
    scalar. Empty mask or all-zero weights -> 0.0.
    """
    m = _bool_mask(mask, weights.shape, weights.device)
    w = weights.detach().to(torch.float64).reshape(-1)[m]
    n = w.numel()
    if n == 0:
        return _scalar(0.0, weights.device)
    sq = (w * w).sum()
    if sq <= 0:
        return _scalar(0.0, weights.device)
    ess = w.sum() ** 2 / sq
    if normalized:
        ess = ess / n
    return ess.to(_OUT_DTYPE)


def _tau_key(tau: float) -> str:
    return f"{tau:g}"


def mismatch_metrics(
    logp_train: Tensor,
    logp_infer: Tensor,
    mask: Tensor | None = None,
    taus: Sequence[float] = (1.5, 2.0, 5.0),
) -> dict[str, float]:
    """Logging dict of mismatch metrics over masked-in tokens.

    Keys: ``"mismatch_kl"`` (:func:`mismatch_kl`), ``f"extreme_frac_{tau:g}"``
    for each tau (:func:`extreme_fraction`; default keys ``extreme_frac_1.5``,
    ``extreme_frac_2``, ``extreme_frac_5``), ``"ess"`` (normalised
    :func:`effective_sample_size` of the weights ``r_t``, computed as
    ``exp(log r_t - max log r)`` since ESS is scale-invariant) and
    ``"tokens"`` (n, as float). Values are python floats.
    """
    lr = _masked_log_ratio(logp_train, logp_infer, mask)
    n = lr.numel()
    out: dict[str, float] = {"mismatch_kl": float(mismatch_kl(logp_train, logp_infer, mask))}
    for tau in taus:
        out[f"extreme_frac_{_tau_key(tau)}"] = float(
            extreme_fraction(logp_train, logp_infer, tau, mask)
        )
    if n == 0:
        out["ess"] = 0.0
    else:
        w = torch.exp(lr - lr.max())
        out["ess"] = float(effective_sample_size(w, normalized=True))
    out["tokens"] = float(n)
    return out


def routing_metrics(rows_a: Tensor, rows_b: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Logging dict of routing disagreement (see :func:`routing_disagreement`).

    Keys: ``"routing_disagree_any"`` and ``f"routing_disagree_layer_{i}"`` for
    each layer ``i`` in ``range(L)``. Values are python floats.
    """
    per_layer, any_layer = routing_disagreement(rows_a, rows_b, mask)
    out: dict[str, float] = {"routing_disagree_any": float(any_layer)}
    for i, v in enumerate(per_layer.tolist()):
        out[f"routing_disagree_layer_{i}"] = float(v)
    return out
