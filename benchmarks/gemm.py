"""float32 CPU GEMMs: F.linear (MKL) vs agentrl's oneDNN path (agentrl/model/gemm.py), side by side in one run.

1. The model's projection shapes alone (tiny-moe: hidden 128, experts 128 -> 512 -> 128), forward
   GEMM and forward + both backward GEMMs, at row counts from a decode step to a learner batch.
2. Whole steps with the path on vs off, alternating round by round on the same inputs: one learner
   `train_step` on GRPO batches (a new batch every round, as in training, so row counts vary and the
   kernel cache is exercised) and one engine prefill step.

    python benchmarks/gemm.py [--threads 1] [--rounds 16]      # the path is opt-in: AGENTRL_CPU_GEMM=onednn
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from agentrl.model import MoEForCausalLM, gemm, preset  # noqa: E402


def timeit(fn, n: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def shapes_table(n: int) -> None:
    print(f"{'GEMM x[M,K] @ w[N,K]^T':<26}{'F.linear fwd (us)':>18}{'oneDNN fwd':>12}{'ratio':>7}"
          f"{'F.linear f+b':>14}{'oneDNN f+b':>12}{'ratio':>7}")
    for m, k, nn in [(64, 128, 256), (64, 128, 512), (256, 128, 512), (256, 256, 128), (1000, 128, 256),
                     (1000, 128, 512), (4000, 128, 512)]:
        g = torch.Generator().manual_seed(m)
        x, w = torch.randn(m, k, generator=g), torch.randn(nn, k, generator=g)
        dy = torch.randn(m, nn, generator=g)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

        def fb(f):
            xg.grad = wg.grad = None
            f(xg, wg).backward(dy)

        reps = max(3, n * 4000 // m)
        fwd = [timeit(lambda: F.linear(x, w), reps), timeit(lambda: gemm.linear(x, w), reps)]
        both = [timeit(lambda: fb(F.linear), reps), timeit(lambda: fb(gemm.linear), reps)]
        print(f"{f'[{m},{k}] x [{nn},{k}]':<26}{fwd[0] * 1e6:>18.0f}{fwd[1] * 1e6:>12.0f}{fwd[1] / fwd[0]:>7.2f}"
              f"{both[0] * 1e6:>14.0f}{both[1] * 1e6:>12.0f}{both[1] / both[0]:>7.2f}")


def steps_table(rounds: int) -> None:
    from learner import grpo_batch

    from agentrl.engine.forward import Segment, StepWeights, paged_forward
    from agentrl.engine.memory import SlotPool
    from agentrl.learner.learner import LearnerConfig, TorchLearner
    from agentrl.routing import RoutingLayout

    cfg = preset("tiny-moe")
    layout = RoutingLayout.from_config(cfg)
    learner = TorchLearner(MoEForCausalLM(cfg).init_weights(0), LearnerConfig(replay="R3"))
    model = MoEForCausalLM(cfg).init_weights(0).eval()
    pool = SlotPool(4096, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float32,
                    len(cfg.moe_layers), cfg.num_experts_per_tok, layout.dtype)
    weights = StepWeights(model)
    rng = np.random.default_rng(0)
    segs = [Segment(rng.integers(9, cfg.vocab_size, 100).tolist(), 0, np.arange(i * 100, (i + 1) * 100), True)
            for i in range(8)]  # 8 prompts of 100 tokens prefilled in one step
    times: dict[str, dict[str, list[float]]] = {"learner train_step (GRPO 8x8)": {"torch": [], "onednn": []},
                                                 "engine prefill step (8 x 100 tokens)": {"torch": [], "onednn": []}}
    for r in range(rounds + 2):
        batch = grpo_batch(cfg, layout, 8, 8, 40, 16, seed=r)
        for mode in (("torch", "onednn") if r % 2 == 0 else ("onednn", "torch")):
            gemm.enable(mode == "onednn")
            t0 = time.perf_counter()
            learner.train_step(batch)
            t1 = time.perf_counter()
            paged_forward(model, pool, segs, True, weights)
            t2 = time.perf_counter()
            if r >= 2:  # the first rounds build oneDNN's kernels for most row counts
                times["learner train_step (GRPO 8x8)"][mode].append(t1 - t0)
                times["engine prefill step (8 x 100 tokens)"][mode].append(t2 - t1)
    print(f"\n{'step (median of rounds)':<38}{'F.linear (ms)':>14}{'oneDNN (ms)':>13}{'ratio':>7}")
    for name, t in times.items():
        a, b = statistics.median(t["torch"]), statistics.median(t["onednn"])
        print(f"{name:<38}{a * 1e3:>14.1f}{b * 1e3:>13.1f}{b / a:>7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20, help="repetitions of each GEMM (scaled by its size)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not gemm.AVAILABLE:
        sys.exit("this torch build lacks oneDNN's linear op (torch.ops.mkldnn._linear_pointwise)")
    gemm.enable()  # compared side by side whatever AGENTRL_CPU_GEMM says
    print(f"{args.threads} thread(s); ratio = oneDNN / F.linear time (below 1: oneDNN faster)\n")
    shapes_table(args.reps)
    steps_table(args.rounds)


if __name__ == "__main__":
    main()
