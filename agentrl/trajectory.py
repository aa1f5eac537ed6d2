"""The trajectory (DESIGN.md Contract 2): one episode as one appended token sequence.

Owns: the `Trajectory` dataclass and its validation on ingestion. Does not own: how it is produced
(rollout.py) or consumed (the learner).

Shapes (N = number of tokens in the episode):
    tokens     [N] int64    prompt, model output and environment text, in the order appended
    loss_mask  [N] bool     True only for tokens the model generated
    logprobs   [N] float32  behaviour logprob of each generated token (from the engine); 0 elsewhere
    versions   [N] int64    policy version that generated each token; -1 for prompt/environment tokens
    routing    RoutingRows  N-1 rows (every fed token), each with the version of the weights that
                            computed it; None for a dense model or an engine without row capture
A trajectory that fails validation is rejected with a reason; it is never silently fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agentrl.routing import RoutingLayout, RoutingRows, RoutingRowsError

Status = Literal["ok", "truncated", "env_error", "engine_error"]
STATUSES = ("ok", "truncated", "env_error", "engine_error")


class TrajectoryError(ValueError):
    """A trajectory violates Contract 2; `reason` is a short key for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class Trajectory:
    tokens: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    routing: RoutingRows | None
    reward: float
    status: Status = "ok"
    turn_rewards: list[float] = field(default_factory=list)
    prompt_len: int = 0  # tokens of the initial (chat-templated) prompt
    group_id: str = ""  # samples of the same task share a group (GRPO)
    task_id: str = ""
    turns: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_generated(self) -> int:
        return int(self.loss_mask.sum())

    def validate(self, layout: RoutingLayout | None = None) -> None:
        """Lengths agree, rows == N-1 with valid experts, generated tokens have finite logprobs and
        non-decreasing versions. Raises TrajectoryError."""
        n = len(self)
        for name in ("loss_mask", "logprobs", "versions"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise TrajectoryError("length_mismatch", f"{name} has shape {arr.shape}, tokens have ({n},)")
        if self.status not in STATUSES:
            raise TrajectoryError("bad_status", f"status {self.status!r} not in {STATUSES}")
        if n < 2:
            raise TrajectoryError("too_short", f"{n} tokens")
        gen = self.loss_mask.astype(bool)
        if gen[0]:
            raise TrajectoryError("loss_mask", "the first token cannot be generated (nothing precedes it)")
        if not np.isfinite(self.logprobs[gen]).all() or (self.logprobs[gen] > 1e-6).any():
            raise TrajectoryError("logprobs", "generated tokens need finite logprobs <= 0")
        v = self.versions[gen]
        if (v < 0).any() or (np.diff(v) < 0).any():
            raise TrajectoryError("versions", "generated-token versions must be >= 0 and non-decreasing")
        if self.routing is not None:
            if layout is None:
                raise TrajectoryError("routing", "a layout is needed to validate routing rows")
            if self.routing.start != 0:
                raise TrajectoryError("routing", f"rows start at {self.routing.start}, not 0")
            try:
                self.routing.validate(layout, expected_rows=n - 1)
            except RoutingRowsError as e:
                raise TrajectoryError("routing", str(e)) from None
            if (np.diff(self.routing.versions) < 0).any():
                raise TrajectoryError("versions", "row versions must be non-decreasing")
