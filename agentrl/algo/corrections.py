"""Training-inference mismatch corrections (pure torch functions, no gradient).

This module owns the per-token importance weights and rejection masks that
correct for the inference engine sampling from ``pi_infer`` while the learner
optimises ``pi_old`` (its own recomputation at the same weights): TIS, token /
sequence (masked) IS, geometric-mean rejection, IcePop and Metropolis
acceptance, plus a by-name dispatcher. It does not own losses (the weights are
consumed by ``losses.ppo_clip`` / ``losses.gspo``) nor the diagnostic metrics
(``metrics.py``).

Conventions
-----------
* Per token ``log rho_t = logp_old(t) - logp_infer(t)``, ``rho_t = pi_old / pi_infer``.
  Sequence quantities use only masked-in tokens:
  ``log R_i = sum_t log rho_t`` (product ratio), ``log G_i = log R_i / n_i``
  (geometric mean). Everything is computed in float64 under ``no_grad``, so a
  product of 1,000 ratios of 2 neither overflows nor carries gradient.
* Every correction returns ``(weights, keep, stats)``:
  ``weights [B, T]`` float32 constants, ``keep [B, T]`` bool. Tokens outside
  ``mask`` and rejected tokens have ``keep = False`` and ``weight = 0``. The
  learner uses ``mask & keep`` as the loss mask and multiplies the per-token
  loss by ``weights``. Any correction composes with any loss.
* ``stats`` (detached float32 scalars): ``is_weight_mean`` (mean weight over
  kept tokens), ``ess`` (normalised ESS of the weights over masked-in tokens,
  rejected tokens counting as weight 0, see ``metrics.effective_sample_size``),
  and ``clip_frac`` (truncating corrections) or ``mask_frac`` (rejecting ones):
  fraction of masked-in tokens capped / rejected. Metropolis adds
  ``accepted_frac``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from agentrl.algo.metrics import effective_sample_size

__all__ = [
    "CORRECTIONS",
    "apply_correction",
    "no_correction",
    "tis",
    "token_mis",
    "seq_is",
    "seq_mis",
    "geo_mean_reject",
    "icepop",
    "metropolis",
]

Correction = tuple[Tensor, Tensor, dict[str, Tensor]]


def _prepare(logp_old: Tensor, logp_infer: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(log_rho float64 [B, T] with 0 off-mask, mask bool [B, T])``."""
    if logp_old.shape != logp_infer.shape or logp_old.dim() != 2:
        raise ValueError(
            f"logp_old and logp_infer must be the same [B, T]; got {tuple(logp_old.shape)} "
            f"and {tuple(logp_infer.shape)}"
        )
    m = torch.as_tensor(mask, device=logp_old.device)
    if m.shape != logp_old.shape:
        raise ValueError(f"mask has shape {tuple(m.shape)}, expected {tuple(logp_old.shape)}")
    m = m if m.dtype == torch.bool else m != 0
    lr = logp_old.detach().to(torch.float64) - logp_infer.detach().to(torch.float64)
    return torch.where(m, lr, torch.zeros_like(lr)), m


def _seq_log_ratio(log_rho: Tensor) -> Tensor:
    """``log R_i = sum_t log rho_t`` over masked-in tokens (0 off-mask) -> ``[B]``."""
    return log_rho.sum(-1)


def _frac(flag: Tensor, m: Tensor) -> Tensor:
    n = m.sum().clamp(min=1).to(torch.float64)
    return ((flag & m).sum().to(torch.float64) / n).to(torch.float32)


def _finish(w: Tensor, keep: Tensor, m: Tensor, frac_key: str, flag: Tensor) -> Correction:
    keep = keep & m
    w = torch.where(keep, w, torch.zeros_like(w))
    n_keep = keep.sum().clamp(min=1).to(torch.float64)
    stats = {
        "is_weight_mean": (w.sum() / n_keep).to(torch.float32),
        frac_key: _frac(flag, m),
        "ess": effective_sample_size(w, m),
    }
    return w.to(torch.float32), keep, stats


def no_correction(logp_old: Tensor, logp_infer: Tensor, mask: Tensor) -> Correction:
    """No correction: ``w_t = 1``, ``keep = mask`` (weights 0 off the mask)."""
    with torch.no_grad():
        _, m = _prepare(logp_old, logp_infer, mask)
        return _finish(m.to(torch.float64), m, m, "mask_frac", torch.zeros_like(m))


def tis(logp_old: Tensor, logp_infer: Tensor, mask: Tensor, cap: float = 2.0) -> Correction:
    """Truncated token IS: ``w_t = min(rho_t, C)``; nothing rejected.

    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy
    RL Training" (fengyao.notion.site/off-policy-rl). Stats: ``clip_frac`` =
    fraction of masked tokens with ``rho_t > C``.
    """
    with torch.no_grad():
        lr, m = _prepare(logp_old, logp_infer, mask)
        capped = lr > math.log(cap)
        w = torch.exp(lr.clamp(max=math.log(cap)))
        return _finish(w, m, m, "clip_frac", capped)


def token_mis(logp_old: Tensor, logp_infer: Tensor, mask: Tensor, cap: float = 2.0) -> Correction:
    """Masked token IS: ``w_t = rho_t * 1[rho_t <= C]``, ``keep_t = rho_t <= C``.

    Liu, Li et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse
    from the Training-Inference Mismatch" (token-level MIS). Stats: ``mask_frac``.
    """
    with torch.no_grad():
        lr, m = _prepare(logp_old, logp_infer, mask)
        keep = lr <= math.log(cap)
        w = torch.exp(lr.clamp(max=math.log(cap)))
        return _finish(w, keep, m, "mask_frac", ~keep)


def seq_is(logp_old: Tensor, logp_infer: Tensor, mask: Tensor, cap: float = 2.0) -> Correction:
    """Truncated sequence IS: ``w_{i,t} = min(prod_t rho_t, C)`` on every token of sequence i.

    Computed as ``exp(min(sum_t log rho_t, log C))`` in float64 (no overflow).
    Liu, Li et al. 2025 (Seq-TIS). Stats: ``clip_frac`` = fraction of masked
    tokens in sequences whose ratio exceeds C.
    """
    with torch.no_grad():
        lr, m = _prepare(logp_old, logp_infer, mask)
        log_r = _seq_log_ratio(lr)
        capped = (log_r > math.log(cap))[:, None].expand_as(m)
        w = torch.exp(log_r.clamp(max=math.log(cap)))[:, None].expand_as(lr)
        return _finish(w, m, m, "clip_frac", capped)


def seq_mis(logp_old: Tensor, logp_infer: Tensor, mask: Tensor, cap: float = 2.0) -> Correction:
    """Masked sequence IS: ``w_i = R_i * 1[R_i <= C]``, ``R_i = prod_t rho_t``.

    Sequences above the cap are rejected whole. Liu, Li et al. 2025 (Seq-MIS). ``R_i`` via ``exp(sum log rho)`` in float64;
    rejected sequences never exponentiate their (possibly huge) ratio.
    Stats: ``mask_frac`` (token-weighted).
    """
    with torch.no_grad():
        lr, m = _prepare(logp_old, logp_infer, mask)
        log_r = _seq_log_ratio(lr)
        keep_seq = log_r <= math.log(cap)
        w = torch.exp(log_r.clamp(max=math.log(cap)))[:, None].expand_as(lr)
        keep = keep_seq[:, None].expand_as(m)
        return _finish(w, keep, m, "mask_frac", ~keep)


def geo_mean_reject(
    logp_old: Tensor,
    logp_infer: Tensor,
    mask: Tensor,
    high: float = 1.001,
    low: float | None = None,
) -> Correction:
    """Geometric-mean rejection: keep sequence i iff ``low <= G_i <= high``, weight 1.

    ``G_i = exp( (1/n_i) sum_t log rho_t )`` over its ``n_i`` masked tokens.
    Modelled on verl's geometric rejection sampling (``rollout_rs="geometric"``,
    ``RolloutCorrectionConfig.decoupled_geo_rs``): defaults ``high = 1.001``
    and ``low = 1 / high``; the geometric mean is length-invariant but very
    sensitive, hence thresholds close to 1 (Liu, Li et al. 2025). Stats:
    ``mask_frac`` (token-weighted).
    """
    if low is None:
        low = 1.0 / high
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
    with torch.no_grad():
        lr, m = _prepare(logp_old, logp_infer, mask)
        n = m.sum(-1).clamp(min=1).to(torch.float64)
        log_g = _seq_log_ratio(lr) / n
        keep_seq = (log_g >= math.log(low)) & (log_g <= math.log(high))
        keep = keep_seq[:, None].expand_as(m)
        return _finish(torch.ones_like(lr), keep, m, "mask_frac", ~keep)


def icepop(
    logp_old: Tensor, logp_infer: Tensor, mask: Tensor, alpha: float = 0.5, beta: float = 5.0
) -> Correction:
    """IcePop token masking: ``w_t = rho_t * 1[alpha <= rho_t <= beta]``, keep = inside.

    Ling Team 2025, "Every Step Evolves: Scaling RL for Trillion-Scale Thinking
    Model" (Ring-1T, IcePop), with its defaults ``alpha = 0.5``, ``beta = 5``.
    Stats: ``mask_frac``.
    """
    if not 0 < alpha <= beta:
        raise ValueError(f"need 0 < alpha <= beta, got alpha={alpha}, beta={beta}")
    with torch.no_grad():
        lr, m = _prepare(logp_old, logp_infer, mask)
        keep = (lr >= math.log(alpha)) & (lr <= math.log(beta))
        w = torch.exp(lr.clamp(max=math.log(beta)))
        return _finish(w, keep, m, "mask_frac", ~keep)


def metropolis(
    logp_old: Tensor,
    logp_infer: Tensor,
    mask: Tensor,
    level: str = "token",
    generator: torch.Generator | None = None,
) -> Correction:
    """Metropolis-independence acceptance of inference samples as learner samples.

    Treating ``pi_infer`` as the proposal of an independence sampler whose
    target is ``pi_old``, a sample is accepted with probability
    ``a = min(1, rho)`` (``rho = rho_t`` at ``level="token"``, the product ratio
    ``R_i`` at ``level="sequence"``, one draw per sequence). With ``u ~ U[0, 1)``
    drawn from ``generator``: accepted iff ``u < a``; accepted tokens get
    weight 1, rejected ones ``keep = False``, weight 0. The draws have shape
    ``[B, T]`` (token) or ``[B]`` (sequence) whatever the mask, so the same
    seed gives the same masks. ``generator=None`` uses torch's global RNG.

    Stats: ``accepted_frac`` and ``mask_frac = 1 - accepted_frac`` (over
    masked-in tokens), ``is_weight_mean``, ``ess``.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    with torch.no_grad():
        lr, m = _prepare(logp_old, logp_infer, mask)
        if level == "token":
            accept_p = torch.exp(lr.clamp(max=0.0))
            u = torch.rand(lr.shape, generator=generator, dtype=torch.float64, device=lr.device)
            keep = u < accept_p
        else:
            accept_p = torch.exp(_seq_log_ratio(lr).clamp(max=0.0))
            u = torch.rand(lr.shape[:1], generator=generator, dtype=torch.float64, device=lr.device)
            keep = (u < accept_p)[:, None].expand_as(m)
        w, keep, stats = _finish(torch.ones_like(lr), keep, m, "mask_frac", ~keep)
        stats["accepted_frac"] = _frac(keep, m)
        return w, keep, stats


def _metropolis_token(logp_old: Tensor, logp_infer: Tensor, mask: Tensor, **kw) -> Correction:
    return metropolis(logp_old, logp_infer, mask, level="token", **kw)


def _metropolis_seq(logp_old: Tensor, logp_infer: Tensor, mask: Tensor, **kw) -> Correction:
    return metropolis(logp_old, logp_infer, mask, level="sequence", **kw)


_REGISTRY: dict[str, Callable[..., Correction]] = {
    "none": no_correction,
    "tis": tis,
    "token_mis": token_mis,
    "seq_is": seq_is,
    "seq_mis": seq_mis,
    "geo_mask": geo_mean_reject,
    "icepop": icepop,
    "metropolis_token": _metropolis_token,
    "metropolis_seq": _metropolis_seq,
}
CORRECTIONS: tuple[str, ...] = tuple(_REGISTRY)


def apply_correction(
    name: str, logp_old: Tensor, logp_infer: Tensor, mask: Tensor, **kw
) -> Correction:
    """Run the correction called ``name`` (one of :data:`CORRECTIONS`) with its keyword args.

    Names: ``none``, ``tis``, ``token_mis``, ``seq_is``, ``seq_mis`` (``cap``),
    ``geo_mask`` (``high``, ``low``), ``icepop`` (``alpha``, ``beta``),
    ``metropolis_token`` / ``metropolis_seq`` (``generator``). Unknown names
    raise ``ValueError`` listing the valid ones.
    """
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown correction {name!r}; valid: {', '.join(CORRECTIONS)}"
        ) from None
    return fn(logp_old, logp_infer, mask, **kw)
