"""Top-k routing as pure functions: scores, selection, gates, load-balancing loss.

Owns: how router logits become (expert ids, gate weights), for the softmax router of Qwen3-MoE /
Mixtral / OLMoE and the DeepSeek-V3-style sigmoid router with an aux-loss-free selection bias;
the switch-style load-balancing loss; the aux-loss-free bias update.
Does not own: where the selection comes from when replaying (replay.py) or expert compute
(modeling.py).

The one rule that makes routing replay (R3) work: **replay replaces only the selection**. Gates are
always the training router's own scores gathered at the selected ids, so the router gets gradient
through them whether the ids came from its own top-k or from the inference engine.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def router_scores(logits: torch.Tensor, scoring: Literal["softmax", "sigmoid"] = "softmax") -> torch.Tensor:
    """Per-expert scores in float32. softmax: p = softmax(z); sigmoid: s = σ(z) (DeepSeek-V3).

    logits: [T, E] -> scores [T, E] float32.
    """
    if scoring == "softmax":
        return F.softmax(logits, dim=-1, dtype=torch.float32)
    return torch.sigmoid(logits.float())


def free_topk(scores: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The router's own choice: argtop-k of (scores + bias). The bias steers selection only.

    scores: [T, E]; selection_bias: [E] or None -> ids [T, top_k] int64.
    """
    choice = scores if selection_bias is None else scores + selection_bias.to(scores.dtype)
    return torch.topk(choice, top_k, dim=-1).indices


def gate_weights(
    scores: torch.Tensor, selected: torch.Tensor, norm_topk_prob: bool, scaling: float = 1.0
) -> torch.Tensor:
    """Gate weight of each selected expert: g_j = s[e_j] / (Σ_j s[e_j] if norm_topk_prob) · scaling.

    Differentiable w.r.t. `scores` (hence the router weights) for any `selected`, including replayed
    ids. scores [T, E] float32, selected [T, k] int64 -> [T, k] float32.
    """
    g = scores.gather(-1, selected)
    if norm_topk_prob:
        g = g / g.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if scaling != 1.0:
        g = g * scaling
    return g


def load_balancing_loss(
    probs: torch.Tensor, selected: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss for one MoE layer (Fedus et al. 2021, eq. 4-6).

        L_aux = E · Σ_e f_e · P_e,  f_e = (1/T) Σ_t 1[e ∈ S_t]   (S_t = selected set, so Σ_e f_e = k),
                                    P_e = (1/T) Σ_t p_{t,e}.

    `selected` is the assignment actually used, i.e. the *replayed* ids when replaying, so the loss
    balances the experts that really processed the tokens. Only P carries gradient.
    probs [T, E] (router probabilities), selected [T, k], token_mask [T] (1 = count the token).
    Uniform routing gives L_aux = k.
    """
    if token_mask is None:
        w = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device)
    else:
        w = token_mask.reshape(-1).to(probs.dtype)
    n = w.sum().clamp_min(1.0)
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, selected.reshape(-1), w.repeat_interleave(selected.shape[-1]))
    f = counts / n
    p = (probs * w[:, None]).sum(0) / n
    return num_experts * (f.detach() * p).sum()


@torch.no_grad()
def update_selection_bias(bias: torch.Tensor, selected: torch.Tensor, num_experts: int, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): b_e ← b_e + γ · sign(mean_load − load_e).

    Overloaded experts get their selection bias lowered, underloaded ones raised. Updates `bias` in
    place and returns it. selected [T, k] is the batch's assignment.
    """
    load = torch.bincount(selected.reshape(-1), minlength=num_experts).to(bias.dtype)
    bias += rate * torch.sign(load.mean() - load)
    return bias
