"""What a user sees of a run: metrics.jsonl, TensorBoard scalars, a console table, progress bars, plots.

Owns: `RunLogger` (one per run; `log(step, metrics)` writes a JSON line, TensorBoard scalars and a
console row; `progress()` for rollout collection; `finish()` closes and plots), `read_metrics`
and `plot_metrics` (also usable on a finished run's `metrics.jsonl` from scripts).
Does not own: computing metrics (agentrl.algo.metrics, the learner, the runtime) or deciding
when to log them.

Files under `run_dir`:
    metrics.jsonl    one JSON object per `log` call: {"step", "time" (s since the logger started),
                     metric...}; NaN / inf are written as null so every line is strict JSON
    tensorboard/     one scalar per finite numeric metric per call
    plots/           reward.png, mismatch.png, staleness.png (only those whose metrics exist)
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["RunLogger", "DEFAULT_COLUMNS", "LABELS", "read_metrics", "plot_metrics"]

DEFAULT_COLUMNS: tuple[str, ...] = (
    "reward_mean", "eval_reward", "mismatch_kl", "extreme_frac_2", "routing_disagree_any",
    "staleness_mean", "samples_per_s", "grad_norm", "entropy",
)
# short console headers (the metric names stay as they are in metrics.jsonl and TensorBoard)
LABELS: dict[str, str] = {
    "reward_mean": "reward", "eval_reward": "eval", "mismatch_kl": "mismatch_kl", "extreme_frac_2": "extreme>2",
    "routing_disagree_any": "route_diff", "staleness_mean": "staleness", "samples_per_s": "samples/s",
    "grad_norm": "grad_norm", "entropy": "entropy",
}
_HEADER_EVERY = 20


def _scalar(v: Any) -> Any:
    """Python number for numbers, numpy / torch scalars and 0-d tensors; anything else unchanged."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if hasattr(v, "item") and not isinstance(v, numbers.Real):
        v = v.item()
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v


def _json_safe(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


class RunLogger:
    """Writes one run's metrics to `run_dir` (see the module docstring) and the console.

    `console="table"` prints one fixed-width row per `log` call with `columns` (blank where a
    metric is absent; ~4 significant digits) under a header of their `LABELS`, repeated every 20
    rows; `"quiet"` prints nothing. `plots=False` skips the PNGs in `finish()`.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, console: str = "table",
                 columns: Sequence[str] = DEFAULT_COLUMNS, plots: bool = True):
        if console not in ("table", "quiet"):
            raise ValueError(f"console must be 'table' or 'quiet', got {console!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.console, self.columns, self.plots = console, tuple(columns), plots
        self._file = self.metrics_path.open("a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), flush_secs=10)
        self._header = ["step", *(LABELS.get(c, c) for c in self.columns)]
        self._widths = [6] + [max(10, len(h)) for h in self._header[1:]]
        self._rows = 0
        self._t0 = time.monotonic()
        self._closed = False

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` for `step`: a JSON line, TensorBoard scalars, a console row."""
        values = {k: _scalar(v) for k, v in metrics.items() if k not in ("step", "time")}
        record = {"step": int(step), "time": round(time.monotonic() - self._t0, 3)}
        record.update({k: _json_safe(v) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool):
                    self._writer.add_scalar(k, v, int(step))
        if self.console == "table":
            if self._rows % _HEADER_EVERY == 0:
                print(self._format(self._header), flush=True)
            print(self._format([str(step), *(_cell(values.get(c)) for c in self.columns)]), flush=True)
            self._rows += 1

    def _format(self, cells: Sequence[str]) -> str:
        return " ".join(c.rjust(w) for c, w in zip(cells, self._widths))

    def progress(self, total: int, desc: str) -> tqdm:
        """A progress bar (use as a context manager; `.update(n)`); hidden when stdout is not a TTY."""
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                    disable=True if self.console == "quiet" else None)

    def finish(self) -> list[Path]:
        """Close the files and TensorBoard, write the plots; returns the plot paths (idempotent)."""
        if not self._closed:
            self._closed = True
            self._file.close()
            if self._writer is not None:
                self._writer.close()
        return plot_metrics(self.metrics_path, self.run_dir / "plots") if self.plots else []

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a truncated last line, from a crash mid-write, is skipped)."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return out


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_metrics(metrics_jsonl: str | Path, out_dir: str | Path) -> list[Path]:
    """Write reward.png, mismatch.png and staleness.png (each only if one of its metrics was logged)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas by default

    records = read_metrics(metrics_jsonl)
    present = {k for r in records for k, v in r.items() if v is not None}
    figures = {  # file -> panels, each panel a list of (metric, style)
        "reward.png": [[("reward_mean", "-"), ("eval_reward", "o-")]],
        "mismatch.png": [[("mismatch_kl", "-")], [("routing_disagree_any", "-")]],
        "staleness.png": [[("staleness_mean", "-")]],
    }
    out_dir = Path(out_dir)
    written = []
    for name, panels in figures.items():
        panels = [[m for m in p if m[0] in present] for p in panels]
        panels = [p for p in panels if p]
        if not panels:
            continue
        fig = Figure(figsize=(7, 2.6 * len(panels) + 0.6), layout="constrained")
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, panel in zip(axes, panels):
            for key, style in panel:
                ax.plot(*_series(records, key), style, label=key, markersize=3)
            ax.set_ylabel(panel[0][0] if len(panel) == 1 else "value")
            if panel[0][0] == "mismatch_kl" and all(v > 0 for v in _series(records, "mismatch_kl")[1]):
                ax.set_yscale("log")  # spans orders of magnitude (dense floor vs MoE without R3)
            ax.grid(alpha=0.3)
            if len(panel) > 1:
                ax.legend()
        axes[-1].set_xlabel("step")
        fig.suptitle(f"{name.removesuffix('.png')} ({Path(metrics_jsonl).parent.name})")
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_dir / name, dpi=100)
        written.append(out_dir / name)
    return written
