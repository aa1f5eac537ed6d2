"""The torch learner on a GPU vs the host: one R3 GRPO train_step from the same weights (loss,
mismatch KL, gradients of the last backward) and the step time on each, for tiny-moe and small-moe.

    python benchmarks/learner_device.py [--device cuda]          # needs that device
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from learner import grpo_batch  # noqa: E402

from agentrl.learner.learner import LearnerConfig, TorchLearner  # noqa: E402
from agentrl.model.config import preset  # noqa: E402
from agentrl.model.modeling import MoEForCausalLM  # noqa: E402
from agentrl.routing import RoutingLayout  # noqa: E402


def run(base: MoEForCausalLM, trajs, device: str, steps: int = 5):
    """(metrics of the first step, gradients of its last backward on the host, seconds per later step)."""
    torch.manual_seed(0)
    lrn = TorchLearner(copy.deepcopy(base), LearnerConfig(lr=1e-3, replay="R3", device=device))
    m = lrn.train_step(trajs)
    grads = {n: p.grad.detach().cpu() for n, p in lrn.model.named_parameters() if p.grad is not None}
    for _ in range(2):
        lrn.train_step(trajs)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        lrn.train_step(trajs)
    sync()
    return m, grads, (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    for name in ("tiny-moe", "small-moe"):
        cfg = preset(name)
        base = MoEForCausalLM(cfg).init_weights(0)
        trajs = grpo_batch(cfg, RoutingLayout.from_config(cfg), 8, 8, 40, 16)
        (mc, gc, tc), (md, gd, td) = run(base, trajs, "cpu"), run(base, trajs, args.device)
        diff = max(float((gc[k] - gd[k]).abs().max()) for k in gc)
        scale = max(float(g.abs().max()) for g in gc.values())
        print(f"{name}: loss host {mc['loss']:.6f} {args.device} {md['loss']:.6f}; mismatch_kl {mc['mismatch_kl']:.3e} / "
              f"{md['mismatch_kl']:.3e}; max |g_host - g_dev| {diff:.2e} (max |g| {scale:.2e}); tokens computed "
              f"{md['computed_tokens']:.0f} of {md['batch_tokens']:.0f}; train_step host {tc:.3f}s {args.device} {td:.3f}s")


if __name__ == "__main__":
    main()
