"""Learner update time: R3 replay vs free routing, and packed vs padded batches, side by side.

One `TorchLearner.train_step` (old-policy pass + one optimizer step, fp32, CPU) on the same batch
of variable-length trajectories with engine-style routing rows. Modes alternate round by round.

    python benchmarks/learner.py [--preset tiny-moe] [--seqs 32] [--min-len 64] [--max-len 384] [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from agentrl.learner.learner import LearnerConfig, TorchLearner
from agentrl.model import MoEForCausalLM, preset
from agentrl.routing import RoutingLayout, RoutingRows
from agentrl.trajectory import Trajectory


def batch(cfg, layout, n, lo, hi, seed=0) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(lo, hi + 1))
        prompt = length // 3
        mask = np.zeros(length, bool)
        mask[prompt:] = True
        rows = np.argsort(rng.random((length - 1, layout.num_moe_layers, cfg.num_experts)), -1)[..., : cfg.num_experts_per_tok]
        out.append(Trajectory(
            tokens=rng.integers(9, cfg.vocab_size, length), loss_mask=mask,
            logprobs=np.where(mask, -rng.random(length) * 3, 0).astype(np.float32), versions=np.where(mask, 0, -1),
            routing=RoutingRows(rows.astype(layout.dtype), np.zeros(length - 1, np.int64)),
            reward=float(rng.integers(2)), group_id=str(i // 4)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    cfg = preset(args.preset)
    layout = RoutingLayout.from_config(cfg)
    trajs = batch(cfg, layout, args.seqs, args.min_len, args.max_len)
    base = MoEForCausalLM(cfg).init_weights(0).state_dict()
    runs = {"off/packed": dict(replay="off", layout="packed"), "R3/packed": dict(replay="R3", layout="packed"),
            "off/padded": dict(replay="off", layout="padded"), "R3/padded": dict(replay="R3", layout="padded")}
    learners = {}
    for name, kw in runs.items():
        model = MoEForCausalLM(cfg)
        model.load_state_dict(base)
        learners[name] = TorchLearner(model, LearnerConfig(lr=0.0, **kw))  # lr 0: identical work every round
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds + 1):
        names = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in names:
            t0 = time.perf_counter()
            learners[name].train_step(trajs)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = sum(len(t) for t in trajs)
    print(f"preset={args.preset} {args.seqs} sequences, {tokens} tokens (lengths {args.min_len}-{args.max_len}), "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"{'mode':<14}{'step (s)':>10}{'tokens/s':>10}{'vs off/packed':>15}")
    for k, t in med.items():
        print(f"{k:<14}{t:>10.3f}{tokens / t:>10.0f}{t / med['off/packed']:>15.3f}")
    print(f"R3 overhead: packed {100 * (med['R3/packed'] / med['off/packed'] - 1):+.1f}%, "
          f"padded {100 * (med['R3/padded'] / med['off/padded'] - 1):+.1f}% (goal <= 3%)")
    print(f"packed vs padded speed-up: {med['off/padded'] / med['off/packed']:.2f}x (off), "
          f"{med['R3/padded'] / med['R3/packed']:.2f}x (R3)")


if __name__ == "__main__":
    main()
