"""`agentrl train RECIPE`: the RL loop, as plain code on the Ray driver.

    warm-up (optional SFT on scripted demos) -> actors -> loop:
        keep rollout jobs in flight (async: up to (max_staleness + 1) steps ahead; sync: one step)
        admit finished groups into the buffer unless too stale (dropped, counted)
        when the buffer holds a step's worth of groups: learner.train_step -> publish weights to
        every engine (version + 1, cache flush) -> log / evaluate / checkpoint
Async and sync differ only in how many rollout jobs may be in flight while the learner trains.

Data position: task seeds are drawn in order (group g uses seed train_seeds[0] + g); the set of
groups already trained is checkpointed, so a resumed run neither repeats nor skips a group. A job
lost with a dead rollout worker is resubmitted once per failure; its groups are trained once.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from agentrl.engine.types import SamplingParams
from agentrl.recipe import Recipe, dump_yaml, run_dir
from agentrl.routing import RoutingLayout
from agentrl.runtime.actors import remote_classes
from agentrl.runtime.checkpoint import latest_checkpoint
from agentrl.runtime.logging import RunLogger


def prepare_model(recipe: Recipe, run: Path, log=print) -> str:
    """The checkpoint the run starts from: a given path, or `init-model` (+ warm-up) into the run dir."""
    from agentrl.model import load_pretrained, save_pretrained
    from agentrl.model.checkpoint import init_model

    if recipe.model.path:
        start = recipe.model.path
    else:
        start = str(run / "init")
        if not (Path(start) / "config.json").exists():
            init = recipe.model.init
            init_model(init.preset, start, seed=init.seed, **init.overrides)
    if recipe.warmup is None:
        return start
    warm = run / "warm"
    if (warm / "config.json").exists():
        return str(warm)
    from transformers import AutoTokenizer

    from agentrl.env import make
    from agentrl.sft import collect_demos, warm_up

    tok = AutoTokenizer.from_pretrained(start)
    w = recipe.warmup
    lo = recipe.env.train_seeds[1] - w.demos  # demo tasks come from the end of the training range
    demos = collect_demos(lambda: make(recipe.env.id, **recipe.env.kwargs), tok, range(lo, lo + w.demos),
                          max_total_tokens=recipe.rollout.max_total_tokens)
    model = load_pretrained(start)
    t0 = time.perf_counter()
    losses = warm_up(model, demos, w.steps, batch_size=w.batch_size, lr=w.lr, seed=recipe.seed,
                     lr_schedule=w.lr_schedule, warmup_steps=w.warmup_steps, grad_clip=w.grad_clip)
    if losses:
        tail = losses[-50:]
        log(f"warm-up: {w.steps} steps on {len(demos)} demos in {time.perf_counter() - t0:.0f}s, "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (mean of the last {len(tail)}: {sum(tail) / len(tail):.3f})")
    save_pretrained(model, warm, tokenizer=tok)
    return str(warm)


@dataclass
class _Training:
    """The update the learner is working on."""

    ref: ray.ObjectRef  # train_step's result
    batch: list  # (group index, trajectories) consumed by it
    stale: list[int]  # staleness of each trajectory when the update started
    t0: float  # when it started
    idle_s: float  # how long the learner waited for this batch after the previous update


def _staleness(traj, version: int) -> int:
    gen = traj.versions[traj.loss_mask]
    return version - int(gen.min()) if gen.size else 0


def train(recipe: Recipe, resume: bool = False) -> dict:
    run = run_dir(recipe)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(dump_yaml(recipe))
    rt, ro = recipe.runtime, recipe.rollout
    ckpt = latest_checkpoint(run) if resume else None
    if resume and ckpt is None:
        print(f"--resume: no checkpoint in {run}/checkpoints; starting fresh")
    model_dir = prepare_model(recipe, run)

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS") == "":
            del os.environ["RAY_ADDRESS"]  # set but empty: a local cluster, not an invalid address
        # no address: a new local instance ("local"), never the machine's last `ray start` cluster, which
        # ray.init(address=None) would join and which may be long gone
        ray.init(address=rt.address or os.environ.get("RAY_ADDRESS") or "local", num_cpus=rt.num_cpus,
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    Engine, Worker, Learner = remote_classes(rt.max_restarts)
    from agentrl.model import load_config

    cfg = load_config(model_dir)
    layout = RoutingLayout.from_config(cfg) if cfg.moe_layers else None
    weights_dir = run / "weights"
    weights_dir.mkdir(exist_ok=True)
    e = recipe.engine
    resources = ray.cluster_resources()
    need = e.num_engines + 1  # engines and the learner compute; rollout workers are I/O (num_cpus=0)
    have = resources.get("CPU", 0)
    if need > have:
        raise RuntimeError(f"the Ray cluster has {have:g} CPUs; {e.num_engines} engine(s) + the learner need {need}. "
                           "Lower engine.num_engines or give Ray more CPUs (runtime.num_cpus / ray start --num-cpus).")
    learner_gpus = 1 if recipe.learner.device.startswith("cuda") else 0
    need_gpus = e.num_engines * e.num_gpus_per_engine + learner_gpus
    have_gpus = resources.get("GPU", 0)
    if need_gpus > have_gpus:  # Ray would leave the actors pending forever
        raise RuntimeError(f"the Ray cluster has {have_gpus:g} GPUs; {e.num_engines} engine(s) x "
                           f"engine.num_gpus_per_engine={e.num_gpus_per_engine:g} + {learner_gpus} for the learner "
                           f"(learner.device={recipe.learner.device}) need {need_gpus:g}.")
    tag = f"agentrl:{recipe.name}:{os.getpid()}:{time.time_ns()}"  # actor names: findable, never reused
    engine_names = [f"{tag}:engine:{i}" for i in range(e.num_engines)]
    engines = [Engine.options(name=name, num_gpus=e.num_gpus_per_engine).remote(
        model_dir, str(weights_dir), e.backend, e.dtype, e.max_total_tokens, e.chunk_size, e.url, e.sglang_python,
        e.sglang_args, 30000 + i) for i, name in enumerate(engine_names)]
    workers = [Worker.options(name=f"{tag}:worker:{i}").remote(  # engines by name (RolloutWorkerImpl says why)
        model_dir, recipe.env.id, recipe.env.kwargs, engine_names, layout, ro.simulated_tool_latency)
        for i in range(ro.workers)]
    learner_cfg = recipe.learner.to_learner_config()
    if learner_gpus:  # both backends; Ray picks the GPU
        learner_cfg.device = "cuda"  # the actor sees only the GPU Ray gave it, as cuda:0
    learner = Learner.options(name=f"{tag}:learner", num_gpus=learner_gpus).remote(
        model_dir, learner_cfg, str(weights_dir), 1 if rt.mode == "async" else 0, recipe.seed, recipe.learner.backend)

    # ---- controller state (checkpointed)
    state = {"step": 0, "next_group": 0, "trained_groups": [], "samples": 0}
    if ckpt is not None:
        state = ray.get(learner.load_checkpoint.remote(str(ckpt)))
        print(f"resumed from {ckpt} at step {state['step']}")
        publish(learner, engines, recipe)
    pending_updates: list = []  # async: engine weight loads still running (checked before the next publish)
    trained = set(state["trained_groups"])
    logger = RunLogger(run, tensorboard=recipe.output.tensorboard, console=recipe.output.console)
    sampling = SamplingParams(temperature=ro.temperature, top_p=ro.top_p, max_new_tokens=ro.max_new_tokens)
    capacity = ro.prompts_per_step * ((rt.max_staleness + 1) if rt.mode == "async" else 1)
    jobs: dict = {}  # ObjectRef -> (groups, worker index)
    buffer: deque = deque()  # (group index, trajectories)
    counters = {"dropped_stale": 0, "regenerated_stale": 0, "jobs_retried": 0}
    next_group = state["next_group"]
    version = state["step"]
    last_t, samples_since = time.perf_counter(), 0

    def submit(groups: list[int], w: int) -> None:
        seeds = [recipe.env.train_seeds[0] + g % (recipe.env.train_seeds[1] - recipe.env.train_seeds[0])
                 for g in groups]
        ref = workers[w % len(workers)].run.remote(seeds, ro.group_size, sampling, ro.concurrency,
                                                   ro.max_total_tokens, w)
        jobs[ref] = (groups, w)

    def fill() -> None:
        nonlocal next_group
        in_flight = sum(len(g) for g, _ in jobs.values()) + len(buffer) + (len(training.batch) if training else 0)
        while in_flight < capacity:
            while next_group in trained:
                next_group += 1
            submit([next_group], next_group)
            next_group += 1
            in_flight += 1

    def admit(ref) -> None:
        """A finished rollout job: its groups enter the buffer unless too stale."""
        groups, w = jobs.pop(ref)
        try:
            trajs, _ = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            counters["jobs_retried"] += 1
            submit(groups, w + 1)  # the worker died: same groups, another (or the restarted) worker
            return
        for i, g in enumerate(groups):
            group = trajs[i * ro.group_size:(i + 1) * ro.group_size]
            if not too_stale(g, group):
                buffer.append((g, group))
                bar.update(1)

    def too_stale(g: int, group: list) -> bool:
        """A group older than max_staleness versions is dropped or generated again (counted)."""
        if max(_staleness(t, version) for t in group) <= rt.max_staleness:
            return False
        if rt.stale_policy == "wait":  # the group waits for fresh weights: generated again
            counters["regenerated_stale"] += 1
            submit([g], g)
        else:
            counters["dropped_stale"] += 1
        return True

    def finish_update(metrics: dict) -> None:
        """The learner is done with `training`: publish, log, evaluate, checkpoint."""
        nonlocal version, last_t, samples_since, idle_since, pending_updates
        t_publish = time.perf_counter()
        ray.get(pending_updates)  # long done: the previous update's loads (surfaces their errors)
        # sync: rollouts of the next batch must see the new weights; async: engines load them while the
        # learner goes on (tokens carry the version that produced them, so staleness stays exact)
        version, pending_updates = publish(learner, engines, recipe, wait=rt.mode == "sync")
        idle_since = time.perf_counter()
        batch, trajs = training.batch, [t for _, group in training.batch for t in group]
        trained.update(g for g, _ in batch)
        state["step"] += 1
        samples_since += len(trajs)
        metrics.update(
            reward_mean=float(np.mean([t.reward for t in trajs])), staleness_mean=float(np.mean(training.stale)),
            staleness_max=float(max(training.stale)), samples_per_s=samples_since / (idle_since - last_t),
            turns_mean=float(np.mean([t.turns for t in trajs])),
            ok_frac=float(np.mean([t.status == "ok" for t in trajs])), buffer=float(len(buffer)),
            time_learner_idle_s=training.idle_s, time_train_s=t_publish - training.t0,
            time_publish_s=idle_since - t_publish, **counters)
        last_t, samples_since = idle_since, 0
        if recipe.eval and rt.eval_every and state["step"] % rt.eval_every == 0:
            ray.get(pending_updates)  # evaluate the weights of this step
            metrics["eval_reward"] = evaluate(recipe, workers[0], state["step"])
        logger.log(state["step"], metrics)
        state.update(next_group=min([g for g, _ in buffer] + [g for gs, _ in jobs.values() for g in gs] + [next_group]),
                     trained_groups=sorted(trained), samples=state["samples"] + len(trajs))
        if state["step"] == rt.steps or (rt.checkpoint_every and state["step"] % rt.checkpoint_every == 0):
            ray.get(learner.save_checkpoint.remote(str(run / "checkpoints" / f"step_{state['step']}"), dict(state)))

    bar = logger.progress(total=rt.steps * ro.prompts_per_step, desc="rollout groups")
    bar.update(state["step"] * ro.prompts_per_step)
    if state["step"] == 0 and recipe.eval and rt.eval_every:
        logger.log(0, {"eval_reward": evaluate(recipe, workers[0], state["step"])})
    # The driver never blocks on the learner: while it trains, finished rollouts are admitted and (async)
    # replaced, so episodes keep running. The batch being trained counts against the look-ahead capacity,
    # and staleness is checked when a group arrives and again when a batch is formed.
    training: _Training | None = None
    idle_since = time.perf_counter()
    while state["step"] < rt.steps:
        if rt.mode == "async" or (not buffer and training is None):
            fill()
        ready, _ = ray.wait(list(jobs) + ([training.ref] if training else []), num_returns=1)
        for ref in ready:
            if training is not None and ref == training.ref:
                finish_update(ray.get(ref))
                training = None
            else:
                admit(ref)
        if training is None and state["step"] < rt.steps:
            # checked again here: a group's staleness grows while it waits, and with async weight loading
            # its first tokens may predate the version the driver saw when it was admitted
            fresh = [item for item in buffer if not too_stale(*item)]
            if len(fresh) < len(buffer):
                buffer.clear()
                buffer.extend(fresh)
        if training is None and len(buffer) >= ro.prompts_per_step and state["step"] < rt.steps:
            batch = [buffer.popleft() for _ in range(ro.prompts_per_step)]
            trajs = [t for _, group in batch for t in group]
            now = time.perf_counter()
            training = _Training(learner.train_step.remote(trajs), batch, [_staleness(t, version) for t in trajs],
                                 now, now - idle_since)
    bar.close()
    ray.get(pending_updates)
    ray.get(learner.wait_published.remote())
    summary = {"steps": state["step"], "trained_groups": sorted(trained), **counters,
               "ray": {"gcs_address": ray.get_runtime_context().gcs_address, "nodes": len(ray.nodes())}}
    if recipe.eval:
        summary["final_eval_reward"] = evaluate(recipe, workers[0], state["step"])
    summary["plots"] = [str(p) for p in logger.finish()]
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for eng in engines:
        ray.get(eng.shutdown.remote())
    return summary


def publish(learner, engines, recipe: Recipe, wait: bool = True) -> tuple[int, list]:
    """New weights to every engine: as a Ray object for embedded engines, from disk for servers.
    The disk copy is also what a restarted engine loads. Returns the new version and, with
    `wait=False`, the engines' pending update calls (the learner may start its next update while the
    engines load; their own version tags say which weights produced each token)."""
    rt = recipe.runtime
    embedded = recipe.engine.backend == "embedded"
    # one call: the state dict (a Ray object for embedded engines) and the checkpoint written for
    # servers and restarted engines (in the background unless servers must load it now)
    state_ref, version_ref, path_ref = learner.publish.options(num_returns=3).remote(background=embedded)
    version = ray.get(version_ref)
    if embedded:
        pending = [e.update_weights.remote(state_ref, version, rt.in_flight) for e in engines]
    else:
        path = ray.get(path_ref)
        pending = [e.update_weights_from_disk.remote(path, version, rt.in_flight) for e in engines]
    if wait:
        ray.get(pending)
        pending = []
    return version, pending


def evaluate(recipe: Recipe, worker, step: int) -> float:
    """Mean reward of greedy (or recipe.eval.temperature) episodes on the held-out eval seeds."""
    ev = recipe.eval
    lo, hi = recipe.env.eval_seeds
    seeds = list(range(lo, min(hi, lo + ev.episodes)))
    sampling = SamplingParams(temperature=ev.temperature, max_new_tokens=recipe.rollout.max_new_tokens)
    trajs, _ = ray.get(worker.run.remote(seeds, ev.samples, sampling, recipe.rollout.concurrency,
                                         recipe.rollout.max_total_tokens))
    return float(np.mean([t.reward for t in trajs]))

