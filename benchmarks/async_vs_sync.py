"""Samples/s of the async runtime vs sync (generate, then train) on the same recipe, one run each,
with a simulated tool latency on every environment step (the regime of SWE / browsing agents,
where tools are slow and the GPU/CPU would otherwise idle while episodes wait on them).

    python benchmarks/async_vs_sync.py [--recipe recipes/quickstart.yaml] [--steps 12] [--latency 0.5]
                                       [--max-staleness 1,2,3]

One sync run, then one async run per look-ahead (`runtime.max_staleness`; default: the recipe's
value, then 2 and 3), all from the same warm-up-free model; the first two updates are excluded
(start-up), and samples/s is the other updates' samples over their total time. How much latency
async can hide is set by the look-ahead: with K, at most K + 1 batches (the one training included)
are in flight, so for latency-bound rollouts async can at best reach about (K + 1)x sync, plus what
it gains by not waiting for a batch's slowest episode.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray

from agentrl.recipe import load_recipe
from agentrl.runtime.logging import read_metrics
from agentrl.runtime.train import train


def run(recipe_path: str, mode: str, steps: int, latency: float, out: str, staleness: int) -> tuple[float, float]:
    recipe = load_recipe(recipe_path, [f"runtime.max_staleness={staleness}",
        f"name=bench-{mode}", f"runtime.mode={mode}", f"runtime.steps={steps}", "runtime.eval_every=0",
        "runtime.checkpoint_every=0", "eval=null", "warmup=null", f"rollout.simulated_tool_latency={latency}",
        f"output.dir={out}", "output.console=quiet", "output.plots=false", "output.tensorboard=false",
    ])
    t0 = time.perf_counter()
    train(recipe)
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(f"{out}/bench-{mode}/metrics.jsonl") if "samples_per_s" in r]
    assert len(rows) == steps, f"{mode}: {len(rows)} of {steps} updates logged"
    # samples over time (each update's time is its batch over its rate), not a mean of per-update rates:
    # async updates alternate short and long, and a plain mean of rates would overweight the short ones
    n = recipe.rollout.prompts_per_step * recipe.rollout.group_size
    return n * (steps - 2) / sum(n / r["samples_per_s"] for r in rows[2:]), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--latency", type=float, default=0.5, help="seconds added to every env step")
    ap.add_argument("--max-staleness", default=None,
                    help="comma-separated async look-aheads (default: the recipe's, then 2 and 3)")
    args = ap.parse_args()
    own = load_recipe(args.recipe).runtime.max_staleness
    ks = [int(k) for k in args.max_staleness.split(",")] if args.max_staleness else sorted({own, 2, 3})
    with tempfile.TemporaryDirectory() as out:
        res = {"sync": run(args.recipe, "sync", args.steps, args.latency, out, own)}
        for k in ks:
            res[f"async K={k}"] = run(args.recipe, "async", args.steps, args.latency, f"{out}/k{k}", k)
        ray.shutdown()
    print(f"recipe {args.recipe} (its max_staleness: {own}), {args.steps} updates, simulated tool latency "
          f"{args.latency}s per env step")
    print(f"{'mode':<14}{'samples/s':>12}{'wall (s)':>10}{'vs sync':>9}")
    for mode, (sps, wall) in res.items():
        print(f"{mode:<14}{sps:>12.2f}{wall:>10.1f}{sps / res['sync'][0]:>9.2f}")
    print("goal: async >= 2.5x sync")


if __name__ == "__main__":
    main()
