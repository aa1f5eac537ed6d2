"""Routing replay (Contract 3): one hook, three modes, for our model and transformers' MoE models.

Owns: `RoutingReplay`, the object every MoE router of a model asks for its experts, with modes
  - `off`    : the router picks its own top-k (the ids are still captured, for metrics and engines);
  - `record` : same, and the forward's selection is kept as rows `[T, moe_layers, k]` (R2 records
               the learner's old-policy forward this way);
  - `replay` : the router uses given rows (R3: the inference engine's rows; R2: recorded ones).
and `attach_replay(model)`, which installs it on our `MoEForCausalLM` or on transformers'
Qwen3-MoE / Qwen2-MoE / Mixtral / OLMoE routers.
Does not own: the routing math (router.py) or the row format on the wire (agentrl.routing).

Replay replaces only the top-k *selection*. Gates are the training router's scores gathered at the
replayed ids (router.gate_weights), so the router keeps its gradient; the load-balancing loss uses
the replayed assignment. While replaying, the router's own free choice is captured too, so routing
disagreement (engine rows vs learner routing) can be measured in the same forward.

Token order: rows are flattened over their leading dims, matching how routers see hidden states
(`[B, S, H] -> [B*S, H]`). Pass `[B, S, L, k]` for a padded batch and `[T, L, k]` (or `[1, T, L, k]`)
for a packed one. `mask` (same leading shape, bool) marks tokens that have a row; tokens without
one (padding, a sequence's last token, rows the engine did not return) are routed freely.
Bad rows raise `RoutingReplayError` before any layer runs.
"""

from __future__ import annotations

import contextlib
import enum
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from agentrl.model.router import free_topk, gate_weights, load_balancing_loss, router_scores


class ReplayMode(str, enum.Enum):
    OFF = "off"
    RECORD = "record"
    REPLAY = "replay"


class RoutingReplayError(ValueError):
    """Replay rows that cannot be used: wrong shape, ids out of range, duplicate experts in a row."""


def check_replay_rows(rows: torch.Tensor, num_layers: int, num_experts: int, top_k: int) -> None:
    """Validate rows `[..., num_layers, top_k]` of expert ids; raises RoutingReplayError naming the problem."""
    if not isinstance(rows, torch.Tensor):
        raise RoutingReplayError(f"replay rows must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
        raise RoutingReplayError(f"replay rows must have an integer dtype, got {rows.dtype}")
    if rows.dim() < 3 or tuple(rows.shape[-2:]) != (num_layers, top_k):
        raise RoutingReplayError(
            f"replay rows must have shape [..., moe_layers={num_layers}, top_k={top_k}], got {tuple(rows.shape)}"
        )
    if rows.numel() == 0:
        return
    flat = rows.reshape(-1, num_layers, top_k).long()
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= num_experts:
        bad = ((flat < 0) | (flat >= num_experts)).nonzero()[0].tolist()
        raise RoutingReplayError(
            f"replay rows hold expert id out of range [0, {num_experts}): "
            f"id {int(flat[tuple(bad)])} at token {bad[0]}, layer {bad[1]}"
        )
    if top_k > 1:
        srt = flat.sort(dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]).any(-1)
        if bool(dup.any()):
            t, layer = dup.nonzero()[0].tolist()
            raise RoutingReplayError(
                f"replay rows hold a duplicate expert at token {t}, layer {layer}: {flat[t, layer].tolist()}"
            )


class RoutingReplay:
    """The selection hook shared by all MoE routers of one model (layer index = MoE layer order)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.mode = ReplayMode.OFF
        self.keep_probs = False  # keep router probabilities for `aux_loss` (memory: T x E per layer)
        self._rows: torch.Tensor | None = None  # [T, L, k] int64 while replaying
        self._mask: torch.Tensor | None = None  # [T] bool while replaying
        self._recorded: torch.Tensor | None = None
        self.selected: list[torch.Tensor | None] = [None] * num_layers  # ids used, last forward
        self.free: list[torch.Tensor | None] = [None] * num_layers  # router's own choice, last forward
        self.probs: list[torch.Tensor | None] = [None] * num_layers

    # ------------------------------------------------------------------ modes
    @contextlib.contextmanager
    def record(self) -> Iterator[RoutingReplay]:
        """Route freely; afterwards `recorded` holds the selection `[T, L, k]` (uint8/int64)."""
        self._enter(ReplayMode.RECORD)
        try:
            yield self
            if all(t is not None for t in self.selected):
                self._recorded = self.selected_rows()
        finally:
            self.mode = ReplayMode.OFF

    @contextlib.contextmanager
    def replay(self, rows: torch.Tensor, mask: torch.Tensor | None = None) -> Iterator[RoutingReplay]:
        """Use `rows` [..., L, k] as the selection for every token (where `mask` [...] is True)."""
        check_replay_rows(rows, self.num_layers, self.num_experts, self.top_k)
        lead = rows.shape[:-2]
        if mask is not None and tuple(mask.shape) != tuple(lead):
            raise RoutingReplayError(f"replay mask shape {tuple(mask.shape)} != rows leading shape {tuple(lead)}")
        self._enter(ReplayMode.REPLAY)
        self._rows = rows.reshape(-1, self.num_layers, self.top_k).long()
        self._mask = None if mask is None else mask.reshape(-1).bool()
        try:
            yield self
        finally:
            self.mode, self._rows, self._mask = ReplayMode.OFF, None, None

    def _enter(self, mode: ReplayMode) -> None:
        if self.mode != ReplayMode.OFF:
            raise RuntimeError(f"routing replay is already in mode {self.mode.value!r}; modes do not nest")
        self.mode = mode
        self._recorded = None
        self.selected = [None] * self.num_layers
        self.free = [None] * self.num_layers

    @property
    def recorded(self) -> torch.Tensor:
        if self._recorded is None:
            raise RuntimeError("nothing recorded: run a forward inside `with replay.record():`")
        return self._recorded

    def expect_tokens(self, num_tokens: int) -> None:
        """Called before a forward: a replay row count that does not match the batch is an error."""
        if self.mode == ReplayMode.REPLAY and self._rows.shape[0] != num_tokens:
            raise RoutingReplayError(
                f"replay rows cover {self._rows.shape[0]} tokens but the forward has {num_tokens} tokens"
            )

    # ------------------------------------------------------------------ the hook
    def route(
        self,
        layer: int,
        logits: torch.Tensor,
        scoring: str = "softmax",
        norm_topk_prob: bool = True,
        selection_bias: torch.Tensor | None = None,
        scaling: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routers call this: logits [T, E] -> (expert ids [T, k] int64, gate weights [T, k] float32)."""
        scores = router_scores(logits, scoring)
        free = free_topk(scores.detach(), self.top_k, selection_bias)
        if self.mode == ReplayMode.REPLAY:
            if self._rows.shape[0] != logits.shape[0]:
                raise RoutingReplayError(
                    f"layer {layer}: replay rows cover {self._rows.shape[0]} tokens, router got {logits.shape[0]}"
                )
            ids = self._rows[:, layer]
            if self._mask is not None:
                ids = torch.where(self._mask[:, None], ids, free)
        else:
            ids = free
        self.selected[layer], self.free[layer] = ids, free
        self.probs[layer] = scores if self.keep_probs else None
        return ids, gate_weights(scores, ids, norm_topk_prob, scaling)

    # ------------------------------------------------------------------ results of the last forward
    def selected_rows(self) -> torch.Tensor:
        """Experts used in the last forward, `[T, L, k]` int64."""
        return _stack(self.selected, "selected")

    def free_rows(self) -> torch.Tensor:
        """The routers' own top-k in the last forward (differs from `selected_rows` only when replaying)."""
        return _stack(self.free, "free")

    def aux_loss(self, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over MoE layers of the switch load-balancing loss on the *used* assignment
        (router.load_balancing_loss). Needs `keep_probs = True` during the forward."""
        if any(p is None for p in self.probs):
            raise RuntimeError("aux_loss needs router probabilities: set `keep_probs = True` before the forward")
        losses = [
            load_balancing_loss(p, s, self.num_experts, token_mask) for p, s in zip(self.probs, self.selected)
        ]
        return torch.stack(losses).mean()


def _stack(per_layer: list[torch.Tensor | None], what: str) -> torch.Tensor:
    if any(t is None for t in per_layer):
        raise RuntimeError(f"no {what} routing captured yet: run a forward first")
    return torch.stack(per_layer, dim=1)


# ---------------------------------------------------------------------- transformers models
# Router classes of transformers 5.x that share `forward(h) -> (logits, gate weights, ids)`.
# Value: whether the class casts gate weights back to the logits dtype (Mixtral keeps float32).
_HF_ROUTERS = {
    "Qwen3MoeTopKRouter": True,
    "Qwen2MoeTopKRouter": True,
    "OlmoeTopKRouter": True,
    "MixtralTopKRouter": False,
}


def _hf_router_forward(self, hidden_states: torch.Tensor):
    h = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(h, self.weight)
    ids, gates = self._agentrl_replay.route(
        self._agentrl_layer, logits, "softmax", getattr(self, "norm_topk_prob", True)
    )
    if self._agentrl_cast:
        gates = gates.to(logits.dtype)
    return logits, gates, ids


def _token_count_hook(module, args, kwargs):
    ids = kwargs.get("input_ids", args[0] if args else None)
    x = ids if ids is not None else kwargs.get("inputs_embeds")
    if x is not None:
        n = x.numel() if ids is not None else x.shape[:-1].numel()
        module.routing_replay.expect_tokens(n)


def attach_replay(model: torch.nn.Module) -> RoutingReplay:
    """Install (once) and return the model's `RoutingReplay`.

    Our `MoEForCausalLM` already owns one. For transformers models, each known top-k router's
    forward is replaced by one that asks the hook for its selection; routers are numbered in module
    order, which is layer order. Raises if the model has no supported router.
    """
    existing = getattr(model, "routing_replay", None)
    if isinstance(existing, RoutingReplay):
        return existing
    routers = [m for m in model.modules() if type(m).__name__ in _HF_ROUTERS]
    if not routers:
        raise TypeError(
            f"{type(model).__name__} has no router agentrl can replay (supported: {sorted(_HF_ROUTERS)})"
        )
    r0 = routers[0]
    hook = RoutingReplay(len(routers), r0.num_experts, r0.top_k)
    for i, r in enumerate(routers):
        r._agentrl_replay, r._agentrl_layer = hook, i
        r._agentrl_cast = _HF_ROUTERS[type(r).__name__]
        r.forward = types.MethodType(_hf_router_forward, r)
    model.routing_replay = hook
    model.register_forward_pre_hook(_token_count_hook, with_kwargs=True)
    return hook
