"""Outcome-reward advantage estimators (pure torch functions).

This module owns the mapping from per-sequence rewards to per-sequence
advantages for critic-free RL (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline), and
the broadcast of a sequence advantage onto its tokens. It does not own rewards,
losses or off-policy corrections (see ``losses.py`` / ``corrections.py``).

Conventions
-----------
* ``rewards``: ``[B]`` float (int is accepted and promoted), one scalar per
  sequence. ``group_ids``: ``[B]`` int; sequences with the same id are samples
  of the same prompt. Groups need not be contiguous nor of equal size.
* ``mask``: ``[B, T]`` bool or 0/1 float; 1 = a model-generated token that
  counts in the loss.
* Group statistics are computed in float64 with ``torch.unique(return_inverse)``
  + ``index_add`` (no Python loop); results are returned in the rewards'
  floating dtype (float32 for integer rewards). Advantages carry no gradient.

With ``g(i)`` the group of sequence ``i``, ``n_g`` its size and
``mean_g = (1/n_g) sum_{j in g} r_j``:

    grpo       A_i = (r_i - mean_g) / (std_g + eps)     std_g unbiased (n_g - 1)
    dr_grpo    A_i =  r_i - mean_g
    rloo       A_i =  r_i - (1/(n_g-1)) sum_{j in g, j != i} r_j = n_g/(n_g-1) (r_i - mean_g)
    reinforce_pp_baseline  A_i = whiten_tokens(r_i - mean_g)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "broadcast"]


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.float32


def _group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``(r64 [B], inverse [B], counts [G], group_mean [G])`` in float64."""
    rewards = torch.as_tensor(rewards)
    group_ids = torch.as_tensor(group_ids, device=rewards.device)
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    r = rewards.detach().to(torch.float64)
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    counts = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(
        0, inv, torch.ones_like(r)
    )
    sums = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, r)
    return r, inv, counts, sums / counts.clamp(min=1.0)


def grpo(
    rewards: Tensor, group_ids: Tensor, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO group-normalised advantage (Shao et al. 2024, DeepSeekMath, eq. in sec. 4.1.2).

    ``A_i = (r_i - mean_g) / (std_g + eps)`` with the *unbiased* sample std
    ``std_g = sqrt( sum_{j in g} (r_j - mean_g)^2 / (n_g - 1) )``, as
    ``torch.std``'s default used by DeepSeekMath-style implementations (verl
    ``compute_grpo_outcome_advantage``). A group of size 1 has ``std_g := 0``
    (so ``A_i = 0``). With ``normalize_std=False``: ``A_i = r_i - mean_g``.

    Shapes: ``rewards [B]``, ``group_ids [B]`` -> ``[B]``.
    """
    r, inv, counts, mean = _group_stats(rewards, group_ids)
    dev = r - mean[inv]
    if normalize_std:
        ss = torch.zeros_like(mean).index_add_(0, inv, dev * dev)
        std = torch.sqrt(ss / (counts - 1.0).clamp(min=1.0))
        dev = dev / (std[inv] + eps)
    return dev.to(_out_dtype(torch.as_tensor(rewards)))


def dr_grpo(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr. GRPO advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training").

    ``A_i = r_i - mean_g``: GRPO without the std normalisation (which biases
    toward too-easy / too-hard prompts). Pair it with a constant-normaliser
    aggregation (``losses.aggregate(..., mode="token-sum-norm")``) to also
    remove GRPO's length bias.

    Shapes: ``rewards [B]``, ``group_ids [B]`` -> ``[B]``.
    """
    return grpo(rewards, group_ids, normalize_std=False)


def rloo(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE Leave-One-Out advantage (Kool et al. 2019; Ahmadian et al. 2024).

    ``A_i = r_i - (1/(n_g - 1)) * sum_{j in g, j != i} r_j``
    ``    = n_g / (n_g - 1) * (r_i - mean_g)``;  a group of size 1 gets ``A_i = 0``.

    Shapes: ``rewards [B]``, ``group_ids [B]`` -> ``[B]``.
    """
    r, inv, counts, mean = _group_stats(rewards, group_ids)
    n = counts[inv]
    scale = torch.where(n > 1, n / (n - 1.0).clamp(min=1.0), torch.zeros_like(n))
    return (scale * (r - mean[inv])).to(_out_dtype(torch.as_tensor(rewards)))


def reinforce_pp_baseline(
    rewards: Tensor, group_ids: Tensor, mask: Tensor | None = None, eps: float = 1e-8
) -> Tensor:
    """REINFORCE++-baseline advantage (Hu et al. 2025, "REINFORCE++", arXiv 2501.03262).

    First subtract the group mean, ``c_i = r_i - mean_g``; then whiten globally
    over the batch, as OpenRLHF / verl (``masked_whiten``) do, with statistics
    over *tokens* (sequence ``i`` counted ``n_i = sum_t mask[i, t]`` times)::

        mu    = sum_i n_i c_i / N,                 N = sum_i n_i
        var   = sum_i n_i (c_i - mu)^2 / (N - 1)   (unbiased; 0 if N <= 1)
        A_i   = (c_i - mu) / sqrt(var + eps)

    ``mask=None`` counts every sequence once (``n_i = 1``). ``N == 0`` -> zeros.

    Shapes: ``rewards [B]``, ``group_ids [B]``, ``mask [B, T]`` or None -> ``[B]``.
    """
    r, inv, _, mean = _group_stats(rewards, group_ids)
    c = r - mean[inv]
    if mask is None:
        n = torch.ones_like(c)
    else:
        mask = torch.as_tensor(mask, device=c.device)
        if mask.dim() != 2 or mask.shape[0] != c.shape[0]:
            raise ValueError(f"mask must be [B, T] with B={c.shape[0]}, got {tuple(mask.shape)}")
        n = (mask != 0).sum(-1).to(torch.float64)
    total = n.sum()
    out_dtype = _out_dtype(torch.as_tensor(rewards))
    if total <= 0:
        return torch.zeros_like(c, dtype=out_dtype)
    mu = (n * c).sum() / total
    var = (n * (c - mu) ** 2).sum() / (total - 1.0) if total > 1 else torch.zeros_like(mu)
    return ((c - mu) / torch.sqrt(var + eps)).to(out_dtype)


def broadcast(adv: Tensor, mask: Tensor) -> Tensor:
    """Per-token advantages ``A[i, t] = adv[i] * mask[i, t]`` (0 off the mask).

    Shapes: ``adv [B]``, ``mask [B, T]`` -> ``[B, T]`` in ``adv``'s dtype.
    """
    mask = torch.as_tensor(mask, device=adv.device)
    if adv.dim() != 1 or mask.dim() != 2 or mask.shape[0] != adv.shape[0]:
        raise ValueError(
            f"expected adv [B] and mask [B, T]; got {tuple(adv.shape)} and {tuple(mask.shape)}"
        )
    return adv[:, None] * (mask != 0).to(adv.dtype)
