"""The torch learner: one RL update from a batch of trajectories, with routing replay.

Owns: `LearnerConfig` and `TorchLearner.train_step`: ingestion (validate, drop failed episodes),
advantages, the old-policy forward (logp_old, mismatch metrics, R2 recording), off-policy
corrections, mini-batch updates with micro-batch gradient accumulation, AdamW + clipping + LR
schedule, optional EMA, and publishing weights (state dict + version) for engines.
Does not own: loss formulas (agentrl.algo), batching layouts (batch.py), rollout or scheduling.

The update, in order (each line is plain code in `train_step`):
  1. trajectories -> advantages per sequence (GRPO / Dr.GRPO / RLOO / REINFORCE++ baseline);
  2. no-grad forward at the current weights = π_old, with routing per `replay`:
       off : free routing;  R3 : the engine's rows;  R2 : free, recorded, then replayed in updates;
     mismatch metrics compare π_old with the engine's logprobs π_infer on generated tokens, and the
     engine's rows with the learner's own free top-k (captured even while replaying);
  3. corrections from ρ = π_old / π_infer (TIS, MIS, IcePop, Metropolis...) -> token weights / mask;
  4. `mini_batches` optimizer steps over disjoint shuffled parts of the batch (the R3 paper's
     multi mini-step setting), each accumulating gradients over micro-batches of at most
     `micro_batch_tokens` tokens; the policy loss is PPO-clip or GSPO, plus optional KL to a
     reference, entropy bonus and MoE load-balancing loss (on the replayed assignment).
Every forward of the packed layout computes a GRPO group's shared prompt once (`share_prefix`,
batch.py): same log-probs and gradients, fewer tokens (`computed_tokens` in the metrics). Samples
whose advantage is exactly 0 (a group with equal rewards) run their training forward without
autograd and skip the backward (`skip_zero_advantage`): they take no gradient anyway.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from agentrl.algo import advantages as A
from agentrl.algo import losses as L
from agentrl.algo.corrections import apply_correction
from agentrl.algo.metrics import mismatch_metrics, routing_metrics
from agentrl.learner.batch import (ModelBatch, build_batch, per_sequence, rows_report, sequence_tensor,
                                   shared_prefix_lengths, target_logprobs)
from agentrl.model.modeling import MoEForCausalLM
from agentrl.model.replay import attach_replay
from agentrl.routing import RoutingLayout, RoutingRows
from agentrl.trajectory import Trajectory, TrajectoryError


@dataclass
class LearnerConfig:
    """Learner hyper-parameters; defaults live here only."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    total_steps: int = 1000  # optimizer steps, for cosine / linear decay
    mini_batches: int = 1  # optimizer steps per rollout batch
    fuse_old_pass: bool = True  # one optimizer step on one micro-batch: the old-policy logprobs are the training
    # forward's own (detached), so the separate no-grad pass is skipped (identical result, one forward less)
    skip_zero_advantage: bool = True  # samples whose advantage is exactly 0 (a group whose rewards are all
    # equal) take no gradient when no entropy / aux / KL term is on; their training forward runs without autograd
    # (their log-probs still feed the loss's metrics and, fused, the routing metrics) and they skip the backward,
    # in every micro-batch of every mini-batch (identical update and metrics)
    micro_batch_tokens: int = 8192  # tokens per forward (gradient accumulation above that)
    layout: Literal["packed", "padded"] = "packed"
    pack_row_tokens: int | None = None  # packed row width; None = the longest sequence (bounds O(width^2) attention),
    # times `share_prefix_row_factor` when prefixes are shared (a row then holds a prefix + several suffixes)
    share_prefix: bool = True  # packed layout, agentrl's model: a group's common prefix is computed once per row
    share_prefix_row_factor: int = 4
    share_prefix_row_cap: int = 512  # ... but no wider than this (or the longest sequence, if longer)
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16 = autocast, fp32 master weights
    replay: Literal["off", "R2", "R3"] = "R3"
    advantage: Literal["grpo", "grpo_nostd", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    loss: Literal["ppo", "gspo"] = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.28  # clip-higher (DAPO)
    dual_clip: float | None = None
    gspo_clip_low: float = 3e-4
    gspo_clip_high: float = 4e-4
    agg: str = "token-mean"
    agg_constant: float | None = None  # for token-sum-norm (Dr. GRPO)
    correction: str = "none"  # none | tis | token_mis | seq_is | seq_mis | geo_mask | icepop | metropolis_*
    correction_kwargs: dict = field(default_factory=dict)
    kl_coef: float = 0.0  # needs a reference model
    entropy_coef: float = 0.0
    aux_loss_coef: float = 0.0
    ema_decay: float | None = None  # Polyak averaging of the policy weights
    publish: Literal["policy", "ema"] = "policy"  # which weights go to the engines
    device: str = "cpu"  # where the model trains ("cuda", "cuda:1"); batches, losses and metrics stay on the host
    seed: int = 0


def _rows_into(n: int, width: int, *parts: tuple[list[int], torch.Tensor]) -> torch.Tensor:
    """[n, width] float32 with each part's rows (sequence indices, [k, w <= width]) at their indices;
    differentiable in every part that carries a gradient."""
    out = torch.zeros(n, width)
    for idx, t in parts:
        out = out.index_put((torch.tensor(idx, dtype=torch.long),), F.pad(t.float(), (0, width - t.shape[1])))
    return out


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """LR multiplier per optimizer step (for `LambdaLR`): linear warm-up over `warmup_steps`, then
    constant, or a cosine / linear decay to 0 at `total_steps`."""
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown lr schedule {schedule!r}: constant, cosine or linear")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        if schedule == "linear":
            return 1.0 - frac
        return 1.0
    return f


def _micro_batches(lens: list[int], idx: list[int], budget: int,
                   groups: list[str] | None = None, prefix: dict[str, int] | None = None) -> list[list[int]]:
    """Consecutive parts of `idx` of at most `budget` computed tokens (a single longer sequence gets its
    own part). With `groups` (group_id per sequence) and `prefix` (group_id -> shared prefix length),
    a group's members are taken together, a member after the first in a part costs only its suffix,
    and a group that fits a part whole is not split over two."""
    units: dict[str, list[int]] = {}
    for i in idx:
        units.setdefault((groups[i] or f"-{i}") if groups is not None else f"-{i}", []).append(i)
    prefix = prefix or {}
    out, cur, used = [], [], 0
    for key, members in units.items():
        s = prefix.get(key, 0)
        whole = sum(lens[i] for i in members) - s * (len(members) - 1)
        if cur and used + whole > budget and whole <= budget:
            out.append(cur)
            cur, used = [], 0
        first = True
        for i in members:
            cost = lens[i] if first else lens[i] - s
            if cur and used + cost > budget:
                out.append(cur)
                cur, used, cost = [], 0, lens[i]
            cur.append(i)
            used += cost
            first = False
    return out + ([cur] if cur else [])


class TorchLearner:
    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig | None = None, ref_model: torch.nn.Module | None = None):
        self.cfg = cfg or LearnerConfig()
        self.model = model.float().to(self.cfg.device).train()
        self.ref_model = ref_model.float().to(self.cfg.device).eval() if ref_model is not None else None
        if self.cfg.kl_coef > 0 and ref_model is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        self.hook = attach_replay(model) if getattr(model.config, "num_experts", 0) else None
        self.layout = RoutingLayout.from_config(model.config) if self.hook is not None else None
        # fused: one kernel over all parameters (CPU and CUDA) instead of ~10 ops per parameter tensor
        self.opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, betas=self.cfg.betas,
                                     weight_decay=self.cfg.weight_decay, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(self.cfg.lr_schedule, self.cfg.warmup_steps, self.cfg.total_steps))
        self.ema = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                    if self.cfg.ema_decay is not None else None)
        self.version = 0
        self.gen = torch.Generator().manual_seed(self.cfg.seed)

    # ------------------------------------------------------------------ forward
    def _forward(self, batch: ModelBatch, rows_mode: str, model=None, aux: bool = False):
        model = model or self.model
        kw = dict(attention_mask=batch.attention_mask)
        if isinstance(model, MoEForCausalLM):
            kw["segment_ids"] = batch.segment_ids
            if batch.parent_ids is not None:
                kw.update(parent_ids=batch.parent_ids, position_ids=batch.position_ids)
            if batch.logits_index is not None:
                kw["logits_index"] = batch.logits_index
            if aux:
                kw.update(return_aux_loss=True, token_weights=batch.token_weights)
        elif batch.segment_ids is not None:
            raise ValueError("the packed layout needs agentrl's model; use layout='padded' for transformers models")
        dev = torch.device(self.cfg.device)
        batch = batch.to(dev)
        kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        ctx = (torch.autocast(dev.type, dtype=torch.bfloat16) if self.cfg.dtype == "bfloat16"
               else contextlib.nullcontext())
        mine = model is self.model and self.hook is not None
        if mine and rows_mode == "replay" and batch.routing is not None:
            routing = self.hook.replay(batch.routing, batch.routing_mask)
        elif mine and rows_mode == "record":
            routing = self.hook.record()
        else:
            routing = contextlib.nullcontext()
        with ctx, routing:
            out = model(batch.input_ids, **kw)
        logp, ent = target_logprobs(out.logits, batch)
        aux_loss = getattr(out, "aux_loss", None) if aux else None
        if dev.type == "cpu":
            return logp, ent, aux_loss
        # the loss is computed on the host; backward flows through these copies into the device graph
        return logp.cpu(), ent.cpu(), None if aux_loss is None else aux_loss.cpu()

    def _rows_per_sequence(self, flat_rows: torch.Tensor, batch: ModelBatch) -> list[np.ndarray]:
        r = flat_rows.cpu().reshape(*batch.input_ids.shape, *flat_rows.shape[1:])
        seqs = per_sequence(r, batch)
        return [seqs[i, : n - 1].numpy().astype(self.layout.dtype) for i, n in enumerate(batch.seq_lens)]

    # ------------------------------------------------------------------ the update
    def train_step(self, trajs: list[Trajectory]) -> dict[str, float]:
        cfg, t0 = self.cfg, time.perf_counter()
        m: dict[str, float] = {"rejected": 0.0, "dropped_status": 0.0}
        ok: list[Trajectory] = []
        for t in trajs:
            if t.status not in ("ok", "truncated"):
                m["dropped_status"] += 1
                continue
            try:
                t.validate(self.layout if t.routing is not None else None)
            except TrajectoryError as e:
                m["rejected"] += 1
                m[f"rejected_{e.reason}"] = m.get(f"rejected_{e.reason}", 0.0) + 1
                continue
            ok.append(t)
        if not ok:
            return {**m, "step": float(self.version), "trained_sequences": 0.0}
        if cfg.replay == "R3" and self.layout is not None and any(t.routing is None for t in ok):
            raise ValueError("replay=R3 needs routing rows on every trajectory (engine must return them)")
        n = len(ok)
        lens = [len(t) for t in ok]
        rewards = torch.tensor([t.reward for t in ok], dtype=torch.float64)
        _, group_ids = np.unique([t.group_id for t in ok], return_inverse=True)
        group_ids = torch.from_numpy(group_ids)
        mask = sequence_tensor(ok, "loss_mask", torch.bool)
        logp_infer = sequence_tensor(ok, "logprobs", torch.float32)
        adv_seq = self._advantages(rewards, group_ids, mask).float()

        # ---- 2. old-policy log-probs and routing (no grad), in micro-batches
        logp_old = torch.zeros(n, max(lens))
        logp_ref = torch.zeros_like(logp_old) if self.ref_model is not None else None
        engine_rows, free_rows, recorded = [None] * n, [None] * n, [None] * n
        old_mode = {"off": "free", "R2": "record", "R3": "replay"}[cfg.replay]
        everything = list(range(n))
        share = self._share_prefix
        # micro-batches count a shared prefix once (token prefixes only: rows may shorten it in build_batch)
        prefix = shared_prefix_lengths(ok) if share else {}
        groups = [t.group_id for t in ok] if prefix else None  # nothing shared: the plain packed batches

        def parts(idx: list[int]) -> list[list[int]]:
            return _micro_batches(lens, idx, cfg.micro_batch_tokens, groups, prefix)

        def make(mb: list[int], with_routing: bool) -> ModelBatch:
            shares = bool(prefix) and any(groups[i] in prefix for i in mb)
            return build_batch([ok[i] for i in mb], self.layout, cfg.layout, self._row_tokens(lens, mb, shares),
                               with_routing=with_routing, share_prefix=shares).with_targets(mask[mb])

        fused = cfg.fuse_old_pass and cfg.mini_batches == 1 and len(parts(everything)) == 1

        def take_old(mb: list[int], batch: ModelBatch, lp: torch.Tensor) -> None:
            for j, i in enumerate(mb):
                logp_old[i, : lens[i]] = lp[j, : lens[i]]
            if self.hook is not None:
                free = self._rows_per_sequence(self.hook.free_rows(), batch)
                used = self._rows_per_sequence(self.hook.selected_rows(), batch)
                for j, i in enumerate(mb):
                    free_rows[i], recorded[i] = free[j], used[j]
                    engine_rows[i] = ok[i].routing.experts if ok[i].routing is not None else None
            if self.ref_model is not None:
                with torch.no_grad():
                    lp_ref, _, _ = self._forward(batch, "free", model=self.ref_model)
                for j, i in enumerate(mb):
                    logp_ref[i, : lens[i]] = lp_ref[j, : lens[i]]

        idle = self._idle(adv_seq)

        def forward(mb: list[int], mode: str, with_routing: bool, old: bool):
            """The training forward of samples `mb`: (log-probs, entropy, aux loss, tokens computed, samples
            without autograd), rows in `mb` order. Idle samples (zero gradient) run without autograd; with
            `old`, this forward is also the old-policy pass (fused)."""
            split = [[j for j, i in enumerate(mb) if i not in idle], [j for j, i in enumerate(mb) if i in idle]]
            rows, aux, tokens = [], None, 0
            for pos, grad in zip(split, (True, False)):
                if pos:
                    with torch.set_grad_enabled(grad):
                        sub = [mb[j] for j in pos]
                        batch = make(sub, with_routing=with_routing)
                        lp, ent, aux = self._forward(batch, mode, aux=cfg.aux_loss_coef > 0 and grad)
                        if old:
                            take_old(sub, batch, lp.detach())
                    rows.append((pos, lp, ent))
                    tokens += batch.computed_tokens
            if len(rows) > 1:  # both kinds: back into mb order (aux is never on with idle samples)
                width = max(r[1].shape[1] for r in rows)
                lp = _rows_into(len(mb), width, *((pos, r) for pos, r, _ in rows))
                ent = _rows_into(len(mb), width, *((pos, e) for pos, _, e in rows))
            return lp, ent, aux, tokens, len(split[1])

        def count_skipped(k: int) -> None:
            if k:
                m["skipped_backward"] = m.get("skipped_backward", 0.0) + k

        if fused:  # the training forward (R2: recording is free routing, which replaying it reproduces)
            fused_out = forward(everything, old_mode, cfg.replay == "R3", old=True)
            count_skipped(fused_out[4])
        else:
            with torch.no_grad():
                for mb in parts(everything):
                    batch = make(mb, with_routing=cfg.replay == "R3")
                    lp, _, _ = self._forward(batch, old_mode)
                    take_old(mb, batch, lp)
        m.update(mismatch_metrics(logp_old, logp_infer, mask))
        if self.hook is not None and all(r is not None for r in engine_rows):
            m.update(self._routing_metrics(engine_rows, free_rows))
            m.update({f"rows_{k.removeprefix('rows_')}": float(v) for k, v in rows_report(ok, self.version).items()})
        if cfg.replay == "R2" and not fused:  # replay the learner's own old-policy routing in every update
            ok = [copy.copy(t) for t in ok]
            for t, r in zip(ok, recorded):
                t.routing = RoutingRows(r, np.full(len(r), self.version, dtype=np.int64))

        # ---- 3. training-inference correction
        corr_kw = dict(cfg.correction_kwargs)
        if cfg.correction.startswith("metropolis"):
            corr_kw.setdefault("generator", self.gen)
        weights, keep, cstats = apply_correction(cfg.correction, logp_old, logp_infer, mask, **corr_kw)
        m.update({f"corr_{k}": float(v) for k, v in cstats.items()})
        train_mask = mask & keep.bool()

        # ---- 4. mini-batch updates
        order = torch.randperm(n, generator=self.gen).tolist()
        minis = [order[i:: cfg.mini_batches] for i in range(min(cfg.mini_batches, n))]
        stats: dict[str, list[float]] = {}
        computed = 0
        rows_mode = "replay" if cfg.replay in ("R2", "R3") else "free"
        for mini in minis:
            self.opt.zero_grad(set_to_none=True)
            mini_tokens = max(1, int(train_mask[mini].sum()))
            backward = False
            for mb in ([everything] if fused else parts(mini)):
                if fused:
                    lp, ent, aux, tokens, _ = fused_out
                else:
                    lp, ent, aux, tokens, skipped = forward(mb, rows_mode, cfg.replay != "off", old=False)
                    count_skipped(skipped)
                computed += tokens
                w_share = (int(train_mask[mb].sum()) / mini_tokens if cfg.agg == "token-mean" and cfg.loss == "ppo"
                           else 1.0 if cfg.agg == "token-sum-norm" and cfg.loss == "ppo" else len(mb) / len(mini))
                w = lp.shape[1]  # this micro-batch's longest sequence; the batch tensors are wider
                loss, s = self._loss(lp, ent, aux, logp_old[mb, :w], adv_seq[mb], train_mask[mb, :w],
                                     weights[mb, :w], None if logp_ref is None else logp_ref[mb, :w])
                if loss.requires_grad:  # not when every sample of the micro-batch is idle
                    (loss * w_share).backward()
                    backward = True
                for k, v in s.items():
                    stats.setdefault(k, []).append(float(v))
            if not backward:  # an all-idle mini-batch: the optimizer steps on the zero gradient it has
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            stats.setdefault("grad_norm", []).append(float(gn))
            self.opt.step()
            self.sched.step()
            self._ema_update()
        self.version += 1
        m.update({k: float(np.mean(v)) for k, v in stats.items()})
        m.update(step=float(self.version), lr=self.sched.get_last_lr()[0], reward_mean=float(rewards.mean()),
                 adv_abs_mean=float(adv_seq.abs().mean()), trained_sequences=float(n),
                 trained_tokens=float(train_mask.sum()), batch_tokens=float(sum(lens)),
                 computed_tokens=float(computed), learner_time_s=time.perf_counter() - t0)
        return m

    def _row_tokens(self, lens: list[int], mb: list[int], shares: bool = False) -> int:
        if self.cfg.pack_row_tokens:
            return self.cfg.pack_row_tokens
        longest = max(lens[i] for i in mb)
        if not shares:
            return longest
        # a token attends over its whole row (dense mask, no varlen kernel on CPU), so a token's cost grows
        # with the width: wide rows pay off for short samples of a shared prompt, not for long samples
        # (benchmarks/learner.py --grpo --prompt 70 --max-new 600: 0.5x unshared at 4x the width, 1.0x capped)
        return max(longest, min(longest * self.cfg.share_prefix_row_factor, self.cfg.share_prefix_row_cap))

    @property
    def _share_prefix(self) -> bool:
        """Shared-prefix rows need agentrl's model (its `parent_ids` mask) and the packed layout; a
        subclass with another forward (the megatron-core learner) never gets them."""
        return self.cfg.share_prefix and self.cfg.layout == "packed" and isinstance(self.model, MoEForCausalLM)

    def _idle(self, adv_seq: torch.Tensor) -> set[int]:
        """Samples whose gradient is exactly zero: advantage exactly 0 under a loss with no term that
        reaches every token (entropy bonus, load-balancing loss, KL to the reference)."""
        cfg = self.cfg
        if (not cfg.skip_zero_advantage or cfg.entropy_coef or cfg.aux_loss_coef
                or (cfg.kl_coef and self.ref_model is not None)):
            return set()
        return set(torch.nonzero(adv_seq == 0).flatten().tolist())

    def _advantages(self, rewards, group_ids, mask) -> torch.Tensor:
        a = self.cfg.advantage
        if a == "grpo":
            return A.grpo(rewards, group_ids)
        if a == "grpo_nostd":
            return A.grpo(rewards, group_ids, normalize_std=False)
        if a == "dr_grpo":
            return A.dr_grpo(rewards, group_ids)
        if a == "rloo":
            return A.rloo(rewards, group_ids)
        if a == "reinforce_pp":
            return A.reinforce_pp_baseline(rewards, group_ids, mask)
        raise ValueError(f"unknown advantage {a!r}")

    def _loss(self, logp, ent, aux, logp_old, adv_seq, mask, weights, logp_ref):
        cfg = self.cfg
        if cfg.loss == "gspo":
            loss, s = L.gspo(logp, logp_old, adv_seq, mask, cfg.gspo_clip_low, cfg.gspo_clip_high, weights=weights)
        elif cfg.loss == "ppo":
            loss, s = L.ppo_clip(logp, logp_old, A.broadcast(adv_seq, mask), mask, cfg.clip_low, cfg.clip_high,
                                 cfg.dual_clip, weights=weights, agg=cfg.agg, agg_constant=cfg.agg_constant)
        else:
            raise ValueError(f"unknown loss {cfg.loss!r}")
        s = {f"pg_{k}": v for k, v in s.items()}
        s["pg_loss"] = loss.detach()
        entropy = L.entropy_bonus(ent, mask, "token-mean")
        s["entropy"] = entropy.detach()
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * entropy
        if logp_ref is not None and cfg.kl_coef:
            kl = L.kl_penalty(logp, logp_ref, mask, kind="k3")
            s["kl_ref"] = kl.detach()
            loss = loss + cfg.kl_coef * kl
        if aux is not None and cfg.aux_loss_coef:
            s["aux_loss"] = aux.detach()
            loss = loss + cfg.aux_loss_coef * aux
        s["loss"] = loss.detach()
        return loss, s

    def _routing_metrics(self, engine_rows, free_rows) -> dict[str, float]:
        a = torch.from_numpy(np.concatenate(engine_rows).astype(np.int64))
        b = torch.from_numpy(np.concatenate(free_rows).astype(np.int64))
        return routing_metrics(a, b)

    @torch.no_grad()
    def _ema_update(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.ema_decay
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                self.ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.ema[k].copy_(v)

    def weights(self) -> tuple[dict[str, torch.Tensor], int]:
        """(state dict for engines, the version it is). EMA weights when `publish == "ema"`."""
        src = self.ema if (self.cfg.publish == "ema" and self.ema is not None) else self.model.state_dict()
        return {k: v.detach().to("cpu", copy=True) for k, v in src.items()}, self.version
