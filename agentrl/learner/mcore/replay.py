"""Routing replay (Contract 3) through megatron-core's own `RouterReplay`.

Owns: `MaskedRouterReplay`, a `megatron.core.transformer.moe.router_replay.RouterReplay` that also
routes freely the tokens that have no row (padding, a sequence's last token, rows an engine did not
return) and keeps what each forward used; and `McoreRoutingReplay`, which gives the learner the same
interface as agentrl's `RoutingReplay` (`replay`, `record`, `selected_rows`, `free_rows`,
`aux_loss`) over the routers of one GPTModel.
Does not own: the row format (agentrl.routing) or the batch layouts (agentrl.learner.batch).

How replay reaches megatron: every TopKRouter built with `moe_enable_routing_replay` asks its
RouterReplay for the top-k (`moe_utils.topk_routing_with_score_function` -> `get_replay_topk`).
`replay(rows)` sets each router's target indices (`set_target_indices`) and the action
`REPLAY_FORWARD`; the router's probabilities are then its own scores gathered at the replayed ids,
so the router keeps its gradient. `record()` uses `RECORD`; `get_recorded_indices` returns the
selection. The instances of one model are driven directly rather than through megatron's
process-wide list, so two models (policy and reference, or two tests) never see each other's rows.

Layers: rows hold every MoE layer; each router takes the column of its own layer (its global
`layer_number`), so a pipeline stage replays exactly the layers it owns. Expert parallelism needs no
slicing: every rank's router scores all experts and rows hold global expert ids.

Token order: megatron's hidden states are `[S, B, H]`, so router token t = s * B + b. agentrl's rows
are batch-major `[B, S, L, k]`; they are transposed here, and `selected_rows` / `free_rows` come
back batch-major `[B * S, L, k]` like agentrl's hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from agentrl.model.config import MoEConfig
from agentrl.model.replay import RoutingReplayError, check_replay_rows
from agentrl.model.router import load_balancing_loss


class MaskedRouterReplay(RouterReplay):
    """megatron's RouterReplay for one router, plus: a token mask for REPLAY_FORWARD (tokens without a
    row keep the router's own top-k), and the free / used ids and routing scores of the last forward."""

    def __init__(self, router) -> None:
        super().__init__()
        RouterReplay.global_router_replay_instances.remove(self)  # driven per model, see module doc
        self.target_mask: torch.Tensor | None = None  # [T] bool (sequence-first token order)
        self.keep_scores = False
        self.free: torch.Tensor | None = None
        self.used: torch.Tensor | None = None
        self.probs: torch.Tensor | None = None
        self._router = [router]  # a list: not an attribute torch or megatron would walk

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        values, free = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        self.free = free.detach()
        if self.keep_scores:
            self.probs = self._probs(scores)
        if self.router_replay_action == RouterReplayAction.REPLAY_FORWARD and self.target_topk_idx is not None:
            target = self.target_topk_idx.to(scores.device)
            if target.shape != free.shape:
                raise RoutingReplayError(f"replay rows cover {target.shape[0]} tokens, router got {free.shape[0]}")
            ids = target if self.target_mask is None else torch.where(self.target_mask.to(scores.device)[:, None],
                                                                      target, free)
            self.used = ids
            return scores.gather(1, ids), ids
        if self.router_replay_action == RouterReplayAction.RECORD:
            self.record_indices(free)
        self.used = free
        return values, free

    def _probs(self, scores: torch.Tensor) -> torch.Tensor:
        """Router probabilities for the load-balancing loss, from what the router handed to the top-k."""
        router = self._router[0]
        if router.score_function == "softmax":
            return scores.float() if router.config.moe_router_pre_softmax else torch.softmax(scores.float(), -1)
        bias = getattr(router, "expert_bias", None)
        return scores.float() - bias if bias is not None else scores.float()


class McoreRoutingReplay:
    """agentrl's replay interface over the MoE routers of one megatron GPTModel (in layer order)."""

    def __init__(self, replays: list[MaskedRouterReplay], columns: list[int], num_moe_layers: int, num_experts: int,
                 top_k: int) -> None:
        self.replays, self.columns = replays, columns  # columns: each router's MoE layer index in a row
        self.num_layers, self.num_experts, self.top_k = num_moe_layers, num_experts, top_k
        self.shape: tuple[int, int] | None = None  # (B, S) of the current / last forward
        self.active = False

    @classmethod
    def attach(cls, gpt, cfg: MoEConfig) -> McoreRoutingReplay:
        from megatron.core.transformer.moe.router import TopKRouter

        routers = [m for m in gpt.modules() if isinstance(m, TopKRouter)]
        # a router's layer_number is its global 1-based layer: a pipeline stage owns some MoE layers only
        columns = [cfg.moe_layers.index(r.layer_number - 1) for r in routers]
        for r in routers:
            if r.router_replay is None:
                raise RuntimeError("routers were built without moe_enable_routing_replay")
            r.router_replay = MaskedRouterReplay(r)
        return cls([r.router_replay for r in routers], columns, len(cfg.moe_layers), cfg.num_experts,
                   cfg.num_experts_per_tok)

    def begin_forward(self, batch: int, seq: int, keep_scores: bool = False) -> None:
        """Called by the model before each forward: the batch shape (for token order) and the checks."""
        self.shape = (batch, seq)
        for rp in self.replays:
            rp.keep_scores, rp.probs, rp.free, rp.used = keep_scores, None, None, None
            replaying = rp.router_replay_action == RouterReplayAction.REPLAY_FORWARD
            if replaying and rp.target_topk_idx.shape[0] != batch * seq:
                raise RoutingReplayError(
                    f"replay rows cover {rp.target_topk_idx.shape[0]} tokens but the forward has {batch * seq} tokens")

    # ------------------------------------------------------------------ modes
    @contextlib.contextmanager
    def replay(self, rows: torch.Tensor, mask: torch.Tensor | None = None) -> Iterator[McoreRoutingReplay]:
        """rows [B, S, L, k] (batch-major, as agentrl.learner.batch builds them), mask [B, S] (True = has a row)."""
        check_replay_rows(rows, self.num_layers, self.num_experts, self.top_k)
        if rows.dim() != 4:
            raise RoutingReplayError(f"megatron replay rows must be [B, S, L, k], got {tuple(rows.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(rows.shape[:2]):
            raise RoutingReplayError(f"replay mask shape {tuple(mask.shape)} != rows shape {tuple(rows.shape[:2])}")
        seq_first = rows.transpose(0, 1).reshape(-1, self.num_layers, self.top_k).long()
        m = None if mask is None else mask.transpose(0, 1).reshape(-1).bool()
        with self._mode(RouterReplayAction.REPLAY_FORWARD):
            for col, rp in zip(self.columns, self.replays):
                rp.set_target_indices(seq_first[:, col].contiguous())
                rp.target_mask = m
            yield self

    @contextlib.contextmanager
    def record(self) -> Iterator[McoreRoutingReplay]:
        with self._mode(RouterReplayAction.RECORD):
            yield self

    @contextlib.contextmanager
    def _mode(self, action: RouterReplayAction):
        if self.active:
            raise RuntimeError("routing replay is already active; modes do not nest")
        self.active = True
        for rp in self.replays:
            rp.clear_indices()
            rp.set_router_replay_action(action)
        try:
            yield
        finally:
            self.active = False
            for rp in self.replays:
                rp.clear_router_replay_action()
                rp.target_topk_idx, rp.replay_backward_list, rp.target_mask = None, [], None

    # ------------------------------------------------------------------ results of the last forward
    def _batch_major(self, per_layer: list[torch.Tensor | None], what: str) -> torch.Tensor:
        if self.shape is None or any(t is None for t in per_layer):
            raise RuntimeError(f"no {what} routing captured yet: run a forward first")
        b, s = self.shape
        rows = torch.stack(per_layer, dim=1).cpu()  # [S*B, L, k], sequence-first
        return rows.view(s, b, len(per_layer), self.top_k).transpose(0, 1).reshape(b * s, len(per_layer), self.top_k)

    def selected_rows(self) -> torch.Tensor:
        """Experts used in the last forward, `[B*S, L, k]` int64, batch-major (L = this model's MoE layers)."""
        return self._batch_major([rp.used for rp in self.replays], "selected")

    def free_rows(self) -> torch.Tensor:
        """The routers' own top-k in the last forward, `[B*S, L, k]`, batch-major."""
        return self._batch_major([rp.free for rp in self.replays], "free")

    def recorded_rows(self) -> torch.Tensor:
        """What megatron's RECORD kept (`get_recorded_indices`), `[B*S, L, k]`, batch-major."""
        return self._batch_major([rp.get_recorded_indices() for rp in self.replays], "recorded")

    def aux_loss(self, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over MoE layers of the switch load-balancing loss on the *used* assignment, as
        agentrl's hook computes it. token_mask is batch-major [B*S] (1 = count the token)."""
        if any(rp.probs is None for rp in self.replays):
            raise RuntimeError("aux_loss needs router scores: run the forward with return_aux_loss=True")
        b, s = self.shape
        m = None if token_mask is None else token_mask.reshape(b, s).transpose(0, 1).reshape(-1)
        losses = [load_balancing_loss(rp.probs, rp.used, self.num_experts, m) for rp in self.replays]
        return torch.stack(losses).mean()
