"""Samples/s of the async runtime vs sync (generate, then train) on the same recipe, one run each,
with a simulated tool latency on every environment step (the regime of SWE / browsing agents,
where tools are slow and the GPU/CPU would otherwise idle while episodes wait on them).

    python benchmarks/async_vs_sync.py [--recipe recipes/quickstart.yaml] [--steps 12] [--latency 0.5]

Both runs start from the same warm-up-free model; the first two updates are excluded (start-up).
"""

from __future__ import annotations

import argparse
import statistics
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
    return statistics.mean(r["samples_per_s"] for r in rows[2:]), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--latency", type=float, default=0.5, help="seconds added to every env step")
    ap.add_argument("--max-staleness", type=int, default=None, help="async look-ahead (default: the recipe's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        staleness = args.max_staleness if args.max_staleness is not None else load_recipe(args.recipe).runtime.max_staleness
        res = {mode: run(args.recipe, mode, args.steps, args.latency, out, staleness) for mode in ("sync", "async")}
        ray.shutdown()
    print(f"recipe {args.recipe}, {args.steps} updates, simulated tool latency {args.latency}s per env step, "
          f"async max_staleness {staleness}")
    print(f"{'mode':<8}{'samples/s':>12}{'wall (s)':>10}{'ratio':>8}")
    for mode, (sps, wall) in res.items():
        print(f"{mode:<8}{sps:>12.2f}{wall:>10.1f}{sps / res['sync'][0]:>8.2f}")
    print(f"async / sync: {res['async'][0] / res['sync'][0]:.2f}x (goal >= 2.5x)")


if __name__ == "__main__":
    main()
