"""Policy losses, KL penalty, entropy bonus and loss aggregation (pure torch functions).

This module owns the per-token policy objectives (PPO-clip with clip-higher and
dual clip, GSPO), the KL-to-reference penalty, entropy, and the reduction of a
``[B, T]`` per-token loss to a scalar. It does not compute advantages
(``advantages.py``) nor training-inference mismatch weights (``corrections.py``);
those arrive here as plain tensors (``adv``, ``weights``, and a ``mask`` the
caller has already multiplied by a correction's ``keep``).

Conventions
-----------
* ``logp``, ``logp_old``, ``logp_ref``: ``[B, T]`` per-token log-probs of the
  generated tokens; gradients flow through ``logp`` only (the others are
  treated as constants and detached).
* ``mask``: ``[B, T]`` bool or 0/1; only masked-in tokens count. Values at
  masked-out positions never reach the loss (they are replaced by 0 with
  ``torch.where`` before any ``exp``), so padding may hold garbage.
* Policy losses return ``(loss, stats)``: ``loss`` a differentiable scalar to
  *minimise*; ``stats`` a ``dict[str, Tensor]`` of detached float32 scalars.
* An empty mask gives a loss of exactly 0 that is still attached to the graph
  (``backward()`` works and yields zero gradients, never NaN).
* Per-token log ratios are clamped to ``[-20, 20]`` before ``exp`` (as verl
  does) so that a diverged token cannot produce ``inf``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AGG_MODES",
    "aggregate",
    "ppo_clip",
    "gspo",
    "kl_penalty",
    "entropy_bonus",
    "token_entropy",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum-norm")
_LOG_RATIO_CLAMP = 20.0


def _bool_mask(mask: Tensor, like: Tensor) -> Tensor:
    mask = torch.as_tensor(mask, device=like.device)
    if mask.shape != like.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _check_pair(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {na} {tuple(a.shape)} vs {nb} {tuple(b.shape)}")
    if a.dim() != 2:
        raise ValueError(f"{na} must be [B, T], got {tuple(a.shape)}")


def _zero(x: Tensor) -> Tensor:
    """A 0-d zero of ``x``'s dtype and device (the ``else`` branch of a masking ``where``)."""
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _stat(x: Tensor | float) -> Tensor:
    return torch.as_tensor(x).detach().to(torch.float32)


def _masked_mean_stat(x: Tensor, m: Tensor) -> Tensor:
    """Detached float32 mean of ``x`` over ``m`` (0 if empty)."""
    x = x.detach().to(torch.float64)
    x = torch.where(m, x, _zero(x))
    return _stat(x.sum() / m.sum().clamp(min=1))


def aggregate(
    per_token: Tensor, mask: Tensor, mode: str = "token-mean", constant: float | None = None
) -> Tensor:
    """Reduce a per-token quantity ``x [B, T]`` to a scalar over masked-in tokens.

    With ``m[i, t]`` the mask, ``n_i = sum_t m[i, t]`` and ``S = {i : n_i > 0}``:

    * ``token-mean``:          ``sum_{i,t} m x / sum_{i,t} m``   (one mean over all tokens)
    * ``seq-mean-token-mean``: ``(1/|S|) sum_{i in S} (sum_t m x) / n_i``
    * ``seq-mean-token-sum``:  ``(1/|S|) sum_{i in S} sum_t m x``
    * ``token-sum-norm``:      ``sum_{i,t} m x / constant``  (Dr. GRPO, Liu et al. 2025:
      a length-independent normaliser, e.g. ``B * max_generation_length``);
      ``constant`` is required.

    Sequences with no masked-in token are left out of the sequence means (a
    correction that rejects a whole sequence removes it from the mean). An
    empty mask returns 0 still attached to ``per_token``'s graph.

    Shapes: ``per_token [B, T]``, ``mask [B, T]`` -> scalar (``per_token``'s dtype).
    """
    m = _bool_mask(mask, per_token)
    x = torch.where(m, per_token, _zero(per_token))
    if mode == "token-mean":
        return x.sum() / m.sum().clamp(min=1).to(x.dtype)
    if mode == "token-sum-norm":
        if constant is None:
            raise ValueError("mode 'token-sum-norm' needs `constant` (e.g. max gen length)")
        if not constant > 0:
            raise ValueError(f"constant must be > 0, got {constant}")
        return x.sum() / constant
    n_tok = m.sum(-1)
    n_seq = (n_tok > 0).sum().clamp(min=1).to(x.dtype)
    if mode == "seq-mean-token-mean":
        return (x.sum(-1) / n_tok.clamp(min=1).to(x.dtype)).sum() / n_seq
    if mode == "seq-mean-token-sum":
        return x.sum(-1).sum() / n_seq
    raise ValueError(f"unknown aggregation mode {mode!r}; valid: {', '.join(AGG_MODES)}")


def _masked_log_ratio(logp: Tensor, logp_old: Tensor, m: Tensor) -> Tensor:
    lr = torch.where(m, logp - logp_old.detach(), _zero(logp))
    return lr.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def ppo_clip(
    logp: Tensor,
    logp_old: Tensor,
    adv_tok: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = None,
    weights: Tensor | None = None,
    agg: str = "token-mean",
    agg_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017) with clip-higher and dual clip.

    Per token, with ``r = exp(logp - logp_old)`` and advantage ``A``::

        L1 = -A * r
        L2 = -A * clip(r, 1 - clip_low, 1 + clip_high)     # clip-higher: DAPO, Yu et al. 2025
        L  = max(L1, L2)                                    # = -min(r A, clip(r) A)
        dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games"; verl form),
        only when dual_clip_c = c > 1 is given:
        L  = min(L, -c * A)   if A < 0   else L             # caps the loss at -c*A for A < 0
        L  = L * weights                                    # per-token correction weights

    then ``aggregate(L, mask, agg, agg_constant)``. For ``A < 0`` the dual clip
    engages when ``r > c`` (the loss becomes the constant ``-c A``, zero gradient).

    Stats (over masked-in tokens, detached float32): ``clip_frac`` (fraction
    where ``L2 > L1``, i.e. the clipped branch was taken), ``dual_clip_frac``
    (fraction with ``A < 0`` and ``max(L1, L2) > -c A``), ``ratio_mean``
    (mean of r), ``approx_kl`` (k3 estimate of KL(pi_old || pi):
    ``mean(r - 1 - log r)``).

    Shapes: ``logp``, ``logp_old``, ``mask``, ``weights`` ``[B, T]``;
    ``adv_tok`` ``[B, T]`` (a ``[B]`` tensor is broadcast over tokens).
    """
    _check_pair(logp, logp_old, "logp", "logp_old")
    m = _bool_mask(mask, logp)
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip_c is not None and not dual_clip_c > 1:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    adv = adv_tok.detach()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    _check_pair(logp, adv, "logp", "adv_tok")
    adv = adv.to(logp.dtype)

    log_ratio = _masked_log_ratio(logp, logp_old, m)
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss1, loss2)
    clipped = loss2 > loss1
    dual = torch.zeros_like(m)
    if dual_clip_c is not None:
        loss3 = -adv * dual_clip_c
        neg = adv < 0
        dual = neg & (loss > loss3)
        loss = torch.where(neg, torch.minimum(loss, loss3), loss)
    if weights is not None:
        _check_pair(logp, weights, "logp", "weights")
        loss = loss * weights.detach().to(loss.dtype)

    stats = {
        "clip_frac": _masked_mean_stat(clipped.to(torch.float64), m),
        "dual_clip_frac": _masked_mean_stat(dual.to(torch.float64), m),
        "ratio_mean": _masked_mean_stat(ratio, m),
        "approx_kl": _masked_mean_stat(torch.expm1(log_ratio) - log_ratio, m),
    }
    return aggregate(loss, m, agg, agg_constant), stats


def gspo(
    logp: Tensor,
    logp_old: Tensor,
    adv_seq: Tensor,
    mask: Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071).

    Sequence ratio over the ``n_i`` masked-in tokens of sequence ``i``::

        s_i = exp( (1/n_i) sum_t (logp_t - logp_old_t) )
        J_i = min( s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i )
        loss = -(1/|S|) sum_{i in S} J_i,        S = {i : n_i > 0}

    Implemented token-wise as in the paper's GSPO-token (eq. 13-14), with
    ``sg`` = stop-gradient: ``s_{i,t} = sg(s_i) * exp(logp_t - sg(logp_t))``
    (value ``s_i``; ``d s_{i,t} / d logp_t = s_i``), per-token
    ``L_{i,t} = -min(s_{i,t} A_i, clip(s_{i,t}) A_i) * w_{i,t}``, and
    ``loss = aggregate(L, mask, "seq-mean-token-mean")``. With ``w = 1`` the
    gradient equals that of the sequence objective above exactly, since
    ``d J_i / d logp_t = A_i s_i / n_i`` on the unclipped branch and 0 when
    clipped. Correction ``weights`` multiply the per-token terms before the
    per-sequence token mean (a token with weight 0 still counts in ``n_i``
    unless the caller removes it from ``mask``; corrections set both).

    Stats (detached float32): ``clip_frac`` (fraction of sequences in S where
    the clipped branch was taken), ``seq_ratio_mean`` (mean of ``s_i`` over S).

    Shapes: ``logp``, ``logp_old``, ``mask``, ``weights`` ``[B, T]``; ``adv_seq [B]``.
    """
    _check_pair(logp, logp_old, "logp", "logp_old")
    m = _bool_mask(mask, logp)
    if adv_seq.shape != logp.shape[:1]:
        raise ValueError(f"adv_seq must be [B]={tuple(logp.shape[:1])}, got {tuple(adv_seq.shape)}")
    adv = adv_seq.detach().to(logp.dtype)

    log_ratio = torch.where(m, logp - logp_old.detach(), _zero(logp))
    n_tok = m.sum(-1)
    live = n_tok > 0
    seq_log_ratio = log_ratio.sum(-1) / n_tok.clamp(min=1).to(logp.dtype)  # [B]
    seq_log_ratio = seq_log_ratio.detach().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    s_tok = torch.exp(seq_log_ratio[:, None] + logp - logp.detach())  # value s_i, grad s_i
    a = adv[:, None]
    loss1 = -a * s_tok
    loss2 = -a * torch.clamp(s_tok, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss1, loss2)
    if weights is not None:
        _check_pair(logp, weights, "logp", "weights")
        loss = loss * weights.detach().to(loss.dtype)

    s = torch.exp(seq_log_ratio)
    clipped = -adv * torch.clamp(s, 1.0 - clip_low, 1.0 + clip_high) > -adv * s
    stats = {
        "clip_frac": _masked_mean_stat(clipped.to(torch.float64), live),
        "seq_ratio_mean": _masked_mean_stat(s, live),
    }
    return aggregate(loss, m, "seq-mean-token-mean"), stats


def kl_penalty(
    logp: Tensor,
    logp_ref: Tensor,
    mask: Tensor,
    kind: str = "k3",
    agg: str = "token-mean",
    agg_constant: float | None = None,
) -> Tensor:
    """KL(pi || pi_ref) penalty from tokens sampled by pi (Schulman 2020, "Approximating KL").

    With ``d = logp - logp_ref`` per token (``logp_ref`` detached):

    * ``k1 = d``                              (unbiased, high variance, can be < 0)
    * ``k2 = d^2 / 2``                        (biased, low variance, >= 0)
    * ``k3 = exp(-d) - (-d) - 1``             (unbiased, low variance, >= 0;
      ``= exp(logp_ref - logp) - (logp_ref - logp) - 1``)

    aggregated with ``aggregate(., mask, agg, agg_constant)``; the learner adds
    ``coef * kl_penalty(...)`` to the loss.

    Shapes: ``logp``, ``logp_ref``, ``mask`` ``[B, T]`` -> scalar.
    """
    _check_pair(logp, logp_ref, "logp", "logp_ref")
    m = _bool_mask(mask, logp)
    d = torch.where(m, logp - logp_ref.detach(), _zero(logp))
    if kind == "k1":
        per_tok = d
    elif kind == "k2":
        per_tok = 0.5 * d * d
    elif kind == "k3":
        nd = (-d).clamp(max=_LOG_RATIO_CLAMP)
        per_tok = torch.expm1(nd) - nd
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: k1, k2, k3")
    return aggregate(per_tok, m, agg, agg_constant)


def entropy_bonus(
    entropy: Tensor, mask: Tensor, agg: str = "token-mean", agg_constant: float | None = None
) -> Tensor:
    """Aggregated mean entropy ``aggregate(H, mask, agg)``; the learner *subtracts* coef x this.

    Shapes: ``entropy [B, T]`` (e.g. from :func:`token_entropy`), ``mask [B, T]`` -> scalar.
    """
    return aggregate(entropy, mask, agg, agg_constant)


def token_entropy(logits: Tensor) -> Tensor:
    """Per-position entropy of the softmax policy, ``H = -sum_v p_v log p_v``.

    Computed in float32 from ``log_softmax`` (stable for large logits); ``-inf``
    logits (banned tokens) contribute 0 (``0 log 0 := 0``) without NaN in the
    value or the gradient. Differentiable w.r.t. ``logits``.

    Shapes: ``logits [B, T, V]`` (any ``[..., V]``) -> ``[B, T]`` float32.
    """
    logp = F.log_softmax(logits.to(torch.float32), dim=-1)
    finite = torch.isfinite(logp)
    logp_safe = torch.where(finite, logp, _zero(logp))
    p = torch.where(finite, logp_safe.exp(), _zero(logp))
    return -(p * logp_safe).sum(-1)
