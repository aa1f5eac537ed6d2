"""Training collapse, detected automatically from a run's per-step curves (pure functions).

Owns: the collapse rule of the R3 study and `detect_collapse`, which applies it to a reward curve and
(optionally) an F(2) curve. Does not own: reading runs (benchmarks/r3_study_report.py does that).

The rule (after the R3 paper, arXiv 2510.11370: "performance drops and does not recover", with the
extreme-token fraction F(2) past 0.1 as the mismatch symptom that precedes it):

    s_t   = mean of reward[t - window + 1 .. t]            (trailing moving average; shorter at the start)
    best  = max_t s_t, reached first at step t*
    reward collapse at step c > t*  iff  s_u < best - drop  for every u >= c
                                    and  the run goes on for at least `patience` steps from c
                                    (a drop in the last few steps is not yet evidence)
    F(2) collapse at step c         iff  f_u > f2_threshold for every u in [c, c + patience), with f the
                                    same moving average of F(2) (a sustained excess, not one spike)
    collapse step = the earlier of the two; `reason` says which rule(s) fired.

Steps are the positions in the curve (0-based) unless `steps` gives the logged step numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CollapseRule:
    window: int = 5  # moving-average window (steps)
    drop: float = 0.2  # absolute reward drop below the best smoothed reward
    patience: int = 5  # steps the drop (or F(2) excess) must last to count
    f2_threshold: float = 0.1  # F(2) above this, sustained, is a collapse


@dataclass(frozen=True)
class Collapse:
    collapsed: bool
    step: int | None  # logged step of the collapse (None if none)
    reason: str  # "reward", "f2", "reward+f2" or ""
    best: float  # best smoothed reward
    best_step: int  # logged step where it was first reached


def smooth(x: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average: s_t = mean(x[max(0, t - window + 1) .. t]); NaNs are skipped."""
    a = np.asarray(x, dtype=np.float64)
    out = np.empty_like(a)
    for t in range(len(a)):
        seg = a[max(0, t - window + 1): t + 1]
        seg = seg[~np.isnan(seg)]
        out[t] = seg.mean() if seg.size else np.nan
    return out


def _reward_collapse(s: np.ndarray, rule: CollapseRule) -> tuple[int | None, float, int]:
    t_best = int(np.nanargmax(s))
    best = float(s[t_best])
    below = s < best - rule.drop  # NaN compares False: an unlogged step counts as recovered
    c = None
    for t in range(len(s) - 1, t_best, -1):  # the start of the final run of steps below the bar
        if not below[t]:
            break
        c = t
    if c is not None and len(s) - c < rule.patience:
        c = None
    return c, best, t_best


def _f2_collapse(f: np.ndarray, rule: CollapseRule) -> int | None:
    over = f > rule.f2_threshold
    for t in range(len(f) - rule.patience + 1):
        if over[t: t + rule.patience].all():
            return t
    return None


def detect_collapse(reward: Sequence[float], f2: Sequence[float] | None = None, rule: CollapseRule = CollapseRule(),
                    steps: Sequence[int] | None = None) -> Collapse:
    """Apply the module's rule to one run's curves (same length; `steps` = logged step numbers)."""
    r = np.asarray(reward, dtype=np.float64)
    if r.size == 0 or np.isnan(r).all():
        raise ValueError("detect_collapse needs a non-empty reward curve")
    if f2 is not None and len(f2) != len(r):
        raise ValueError(f"reward has {len(r)} steps but f2 has {len(f2)}")
    at = np.arange(len(r)) if steps is None else np.asarray(steps)
    if len(at) != len(r):
        raise ValueError(f"reward has {len(r)} steps but steps has {len(at)}")
    c_r, best, t_best = _reward_collapse(smooth(r, rule.window), rule)
    c_f = _f2_collapse(smooth(f2, rule.window), rule) if f2 is not None else None
    hits = [(c, name) for c, name in ((c_r, "reward"), (c_f, "f2")) if c is not None]
    if not hits:
        return Collapse(False, None, "", best, int(at[t_best]))
    first = min(c for c, _ in hits)
    return Collapse(True, int(at[first]), "+".join(name for _, name in hits), best, int(at[t_best]))
