"""Report of the R3 collapse study: a table per run (best score, step of best, collapse step) and plots.

    python benchmarks/r3_study_report.py runs/r3_study [--docs docs] [--prefix r3_study]

Reads every `{study}/{variant}_s{seed}/metrics.jsonl` (agentrl.runtime.logging) and `summary.json`,
detects collapse with agentrl.algo.collapse (the rule is in that module's docstring), prints a
Markdown table, writes it to `{study}/report.md` and `{study}/report.json`, and plots the curves of
every run (reward, mismatch KL, F(2), grad norm, entropy) to `{docs}/{prefix}_curves.png`.
Does not own: running anything (r3_study.py) or the collapse rule.

Columns: `best` = best smoothed training reward (sampled success, moving average over the rule's
window) and its step; `collapse` = collapse step and reason, or "never"; `final` = the smoothed
reward at the last step; `eval` = greedy success on held-out tasks at the end (summary.json);
`KL`, `F(2)` = mean over steps of the logged mismatch KL and F(2) (`max F(2)` = worst step);
`route` = mean routing disagreement (engine rows vs the learner's free top-k). With several seeds, a
second table aggregates each variant: runs collapsed out of runs, and the means over seeds of
`final`, `eval`, `KL` and `F(2)`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from agentrl.algo.collapse import CollapseRule, detect_collapse, smooth
from agentrl.runtime.logging import read_metrics

ORDER = ("grpo", "grpo_tis", "grpo_r3", "grpo_tis_r3", "gspo", "gspo_r3", "grpo_metropolis")
CURVES = (("reward_mean", "training reward (smoothed)"), ("mismatch_kl", "mismatch KL (k3)"),
          ("extreme_frac_2", "F(2)"), ("grad_norm", "grad norm"), ("entropy", "entropy"))
_RUN = re.compile(r"^(?P<variant>.+)_s(?P<seed>\d+)$")


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=np.float64)


def summarize_run(run: Path, rule: CollapseRule = CollapseRule()) -> dict:
    """One row of the table (see the module docstring) for a run directory."""
    m = _RUN.match(run.name)
    records = [r for r in read_metrics(run / "metrics.jsonl") if "reward_mean" in r]
    if not records:
        raise ValueError(f"{run}: no training steps logged")
    steps, reward = series(records, "reward_mean")
    f2 = np.array([r.get("extreme_frac_2", np.nan) for r in records], dtype=np.float64)
    c = detect_collapse(reward, f2, rule, steps=steps.tolist())
    s = smooth(reward, rule.window)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}

    def mean(key: str) -> float:
        y = series(records, key)[1]
        return float(np.nanmean(y)) if y.size else float("nan")

    return {
        "run": run.name, "variant": m["variant"] if m else run.name, "seed": int(m["seed"]) if m else 0,
        "steps": int(steps[-1]), "best": c.best, "best_step": c.best_step, "collapsed": c.collapsed,
        "collapse_step": c.step, "collapse_reason": c.reason, "final": float(s[-1]),
        "eval": summary.get("final_eval_reward"), "mismatch_kl": mean("mismatch_kl"),
        "f2": mean("extreme_frac_2"), "f2_max": float(np.nanmax(f2)) if np.isfinite(f2).any() else float("nan"),
        "route": mean("routing_disagree_any"), "finished": bool(summary),
    }


def find_runs(study: Path) -> list[Path]:
    runs = [d for d in study.iterdir() if (d / "metrics.jsonl").exists()]
    rank = {v: i for i, v in enumerate(ORDER)}

    def key(d: Path):
        m = _RUN.match(d.name)
        v, s = (m["variant"], int(m["seed"])) if m else (d.name, 0)
        return rank.get(v, len(rank)), v, s

    return sorted(runs, key=key)


def table(rows: list[dict]) -> str:
    f = lambda x, p=3: "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{p}g}"  # noqa: E731
    head = "| variant | seed | steps | best (step) | collapse | final | eval | KL | F(2) | max F(2) | route |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        col = f"step {r['collapse_step']} ({r['collapse_reason']})" if r["collapsed"] else "never"
        lines.append(f"| {r['variant']} | {r['seed']} | {r['steps']}{'' if r['finished'] else ' (unfinished)'} | "
                     f"{f(r['best'])} ({r['best_step']}) | {col} | {f(r['final'])} | {f(r['eval'])} | "
                     f"{f(r['mismatch_kl'], 2)} | {f(r['f2'], 2)} | {f(r['f2_max'], 2)} | {f(r['route'], 2)} |")
    return "\n".join(lines)


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per variant (in ORDER): seeds, collapsed runs, and means over its runs."""
    rank = {v: i for i, v in enumerate(ORDER)}
    out = []
    for v in sorted({r["variant"] for r in rows}, key=lambda v: (rank.get(v, len(rank)), v)):
        rs = [r for r in rows if r["variant"] == v]

        def mean(key: str) -> float:
            xs = [r[key] for r in rs if r[key] is not None and not np.isnan(r[key])]
            return float(np.mean(xs)) if xs else float("nan")

        out.append({"variant": v, "seeds": sorted(r["seed"] for r in rs), "collapsed": sum(r["collapsed"] for r in rs),
                    "final": mean("final"), "eval": mean("eval"), "mismatch_kl": mean("mismatch_kl"), "f2": mean("f2")})
    return out


def aggregate_table(agg: list[dict]) -> str:
    f = lambda x, p=3: "-" if isinstance(x, float) and np.isnan(x) else f"{x:.{p}g}"  # noqa: E731
    head = "| variant | seeds | collapsed | final (mean) | eval (mean) | KL (mean) | F(2) (mean) |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for a in agg:
        lines.append(f"| {a['variant']} | {len(a['seeds'])} | {a['collapsed']}/{len(a['seeds'])} | {f(a['final'])} | "
                     f"{f(a['eval'])} | {f(a['mismatch_kl'], 2)} | {f(a['f2'], 2)} |")
    return "\n".join(lines)


def plot(runs: list[Path], path: Path, rule: CollapseRule = CollapseRule()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    colors = {v: plt.cm.tab10(i) for i, v in enumerate(ORDER)}
    for run in runs:
        m = _RUN.match(run.name)
        variant = m["variant"] if m else run.name
        records = [r for r in read_metrics(run / "metrics.jsonl") if "reward_mean" in r]
        for ax, (key, title) in zip(axes, CURVES):
            x, y = series(records, key)
            if not y.size:
                continue
            if key == "reward_mean":
                y = smooth(y, rule.window)
            ax.plot(x, y, color=colors.get(variant), ls="-" if "r3" in variant else "--", lw=1.2,
                    label=run.name if ax is axes[0] else None)
            ax.set_title(title)
            ax.set_xlabel("step")
            if key == "mismatch_kl":
                ax.set_yscale("log")
    axes[2].axhline(rule.f2_threshold, color="k", lw=0.6, ls=":")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(study: Path, docs: Path, prefix: str = "r3_study", rule: CollapseRule = CollapseRule()) -> list[dict]:
    runs = find_runs(study)
    if not runs:
        raise SystemExit(f"no runs with metrics.jsonl under {study}")
    rows = [summarize_run(r, rule) for r in runs]
    text = table(rows)
    agg = aggregate(rows)
    if any(len(a["seeds"]) > 1 for a in agg):
        text += "\n\nBy variant, over seeds:\n\n" + aggregate_table(agg)
    print(text)
    (study / "report.md").write_text(f"Collapse rule: {asdict(rule)} (agentrl/algo/collapse.py)\n\n{text}\n")
    (study / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    png = plot(runs, docs / f"{prefix}_curves.png", rule)
    print(f"wrote {study / 'report.md'}, {study / 'report.json'} and {png}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", default="runs/r3_study", help="study directory")
    p.add_argument("--docs", default="docs", help="where the plot goes")
    p.add_argument("--prefix", default="r3_study", help="plot file name prefix")
    p.add_argument("--window", type=int, default=CollapseRule.window)
    p.add_argument("--drop", type=float, default=CollapseRule.drop)
    p.add_argument("--patience", type=int, default=CollapseRule.patience)
    p.add_argument("--f2-threshold", type=float, default=CollapseRule.f2_threshold)
    a = p.parse_args(argv)
    report(Path(a.study), Path(a.docs), a.prefix, CollapseRule(a.window, a.drop, a.patience, a.f2_threshold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
