"""Learner update time: R3 replay vs free routing, and packed vs padded batches, side by side.

One `TorchLearner.train_step` (old-policy pass + one optimizer step, fp32, CPU) on the same batch
of variable-length trajectories with engine-style routing rows. Modes alternate round by round.
`--grpo` instead times a GRPO-shaped batch (groups of samples of one prompt, rows identical on the
prompt) packed plainly vs with each group's prompt computed once (`share_prefix`). `--zero-adv` times
the same GRPO batch with every other group's rewards equal (advantage exactly 0) with and without
`skip_zero_advantage`, fused (one mini-batch, one micro-batch), with 2 mini-batches, and with
micro-batches of `--micro-tokens` tokens.

    python benchmarks/learner.py [--preset tiny-moe] [--seqs 32] [--min-len 64] [--max-len 384] [--rounds 6]
    python benchmarks/learner.py --grpo [--groups 8] [--group-size 8] [--prompt 40] [--max-new 16]
    python benchmarks/learner.py --zero-adv [--groups 8] [--group-size 8] [--micro-tokens 400]
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


def grpo_batch(cfg, layout, groups, size, prompt_len, max_new, seed=0) -> list[Trajectory]:
    """`groups` prompts x `size` samples of 1..max_new generated tokens; a group's rows agree on its prompt."""
    rng = np.random.default_rng(seed)

    def rows(n):
        return np.argsort(rng.random((n, layout.num_moe_layers, cfg.num_experts)), -1)[..., : cfg.num_experts_per_tok]

    out = []
    for g in range(groups):
        prompt, prompt_rows = rng.integers(9, cfg.vocab_size, prompt_len), rows(prompt_len)
        for _ in range(size):
            gen = int(rng.integers(1, max_new + 1))
            length = prompt_len + gen
            mask = np.arange(length) >= prompt_len
            r = np.concatenate([prompt_rows, rows(gen - 1)])
            out.append(Trajectory(
                tokens=np.concatenate([prompt, rng.integers(9, cfg.vocab_size, gen)]), loss_mask=mask,
                logprobs=np.where(mask, -rng.random(length) * 3, 0).astype(np.float32),
                versions=np.where(mask, 0, -1),
                routing=RoutingRows(r.astype(layout.dtype), np.zeros(length - 1, np.int64)),
                reward=float(rng.integers(2)), group_id=str(g)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--grpo", action="store_true", help="GRPO-shaped batch: plain packed vs shared prompts")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--row-factor", type=int, default=None, help="share_prefix_row_factor (default: LearnerConfig's)")
    ap.add_argument("--zero-adv", action="store_true", help="GRPO batch, half the groups with equal rewards: "
                    "skip_zero_advantage on vs off")
    ap.add_argument("--micro-tokens", type=int, default=400,
                    help="micro_batch_tokens of --zero-adv's micro-batched row")
    args = ap.parse_args()
    cfg = preset(args.preset)
    layout = RoutingLayout.from_config(cfg)
    base = MoEForCausalLM(cfg).init_weights(0).state_dict()
    if args.zero_adv:
        trajs = grpo_batch(cfg, layout, args.groups, args.group_size, args.prompt, args.max_new)
        for t in trajs:
            if int(t.group_id) % 2 == 0:
                t.reward = 1.0  # every other group: equal rewards, advantage exactly 0
        setups = {"fused": {}, "2 mini-batches": dict(mini_batches=2),
                  f"micro-batches of {args.micro_tokens}": dict(micro_batch_tokens=args.micro_tokens)}
        runs = {f"{k} / {s}": dict(replay="R3", skip_zero_advantage=s == "skip", **kw)
                for k, kw in setups.items() for s in ("full", "skip")}
    elif args.grpo:
        trajs = grpo_batch(cfg, layout, args.groups, args.group_size, args.prompt, args.max_new)
        share = {} if args.row_factor is None else dict(share_prefix_row_factor=args.row_factor)
        runs = {"off/packed": dict(replay="off", share_prefix=False), "off/shared": dict(replay="off", **share),
                "R3/packed": dict(replay="R3", share_prefix=False), "R3/shared": dict(replay="R3", **share)}
    else:
        trajs = batch(cfg, layout, args.seqs, args.min_len, args.max_len)
        runs = {"off/packed": dict(replay="off", layout="packed", share_prefix=False),
                "R3/packed": dict(replay="R3", layout="packed", share_prefix=False),
                "off/padded": dict(replay="off", layout="padded"), "R3/padded": dict(replay="R3", layout="padded")}
    learners = {}
    for name, kw in runs.items():
        model = MoEForCausalLM(cfg)
        model.load_state_dict(base)
        learners[name] = TorchLearner(model, LearnerConfig(lr=0.0, **kw))  # lr 0: identical work every round
    times: dict[str, list[float]] = {k: [] for k in runs}
    computed: dict[str, float] = {}
    skipped: dict[str, float] = {}
    for r in range(args.rounds + 1):
        names = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in names:
            t0 = time.perf_counter()
            out = learners[name].train_step(trajs)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
            computed[name], skipped[name] = out["computed_tokens"], out.get("skipped_backward", 0.0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = sum(len(t) for t in trajs)
    where = f"{torch.get_num_threads()} threads, median of {args.rounds} rounds"
    if args.zero_adv:
        print(f"preset={args.preset} GRPO batch: {args.groups} groups x {args.group_size} samples ({len(trajs)}), "
              f"every other group with equal rewards, R3, {where}")
        print(f"{'setup / skip_zero_advantage':<36}{'step (s)':>10}{'skipped':>9}{'speed-up':>10}")
        for k, t in med.items():
            print(f"{k:<36}{t:>10.3f}{skipped[k]:>9.0f}{med[k.rsplit(' / ', 1)[0] + ' / full'] / t:>10.2f}")
        return
    if args.grpo:
        print(f"preset={args.preset} GRPO batch: {args.groups} groups x {args.group_size} samples, {args.prompt}-token "
              f"prompt + 1..{args.max_new} generated = {tokens} tokens, {torch.get_num_threads()} threads, "
              f"median of {args.rounds} rounds")
        print(f"{'mode':<14}{'step (s)':>10}{'tokens/s':>10}{'computed':>10}{'vs packed':>11}")
        for k, t in med.items():
            print(f"{k:<14}{t:>10.3f}{tokens / t:>10.0f}{computed[k]:>10.0f}"
                  f"{t / med[k.split('/')[0] + '/packed']:>11.3f}")
        print(f"shared-prefix speed-up: {med['off/packed'] / med['off/shared']:.2f}x (off), "
              f"{med['R3/packed'] / med['R3/shared']:.2f}x (R3)")
        return
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
