"""Learner step time with routing replay (R3) vs free routing, measured side by side in one run.

A step = forward + backward + AdamW on a [batch, seq] batch of the preset (fp32, CPU by default).
Replay steps replay rows recorded from the same batch (so both runs compute the same experts'
work); the two modes alternate step by step so drift in machine speed hits both equally.

    python benchmarks/replay_overhead.py [--preset tiny-moe] [--batch 16] [--seq 128] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from agentrl.model import MoEForCausalLM, preset


def step(model, opt, ids, routing=None) -> float:
    t0 = time.perf_counter()
    logits = model(ids, routing=routing).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MoEForCausalLM(preset(args.preset)).init_weights(0)
    # lr 0: weights (hence routing and expert load) stay fixed, so both modes do identical work
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    hook = model.routing_replay
    with torch.no_grad(), hook.record():
        model(ids)
    rows = hook.recorded.reshape(args.batch, args.seq, hook.num_layers, hook.top_k).to(torch.uint8)
    times: dict[str, list[float]] = {"off": [], "replay": []}
    for i in range(args.warmup + args.steps):
        order = ("off", "replay") if i % 2 == 0 else ("replay", "off")
        for mode in order:
            dt = step(model, opt, ids, rows if mode == "replay" else None)
            if i >= args.warmup:
                times[mode].append(dt)
    off, rep = statistics.median(times["off"]), statistics.median(times["replay"])
    tokens = args.batch * args.seq
    print(f"preset={args.preset} batch={args.batch}x{args.seq} ({tokens} tokens) steps={args.steps} "
          f"threads={torch.get_num_threads()}")
    print(f"{'mode':<10}{'median step (ms)':>18}{'tokens/s':>12}{'ratio vs off':>14}")
    for mode, t in (("off", off), ("replay", rep)):
        print(f"{mode:<10}{t * 1e3:>18.1f}{tokens / t:>12.0f}{t / off:>14.3f}")
    print(f"replay overhead: {100 * (rep / off - 1):+.1f}%  (target <= 3%)")


if __name__ == "__main__":
    main()
