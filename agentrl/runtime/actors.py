"""Ray actors: inference engines, rollout workers and the learner. The loop that drives them is
plain code in train.py.

Owns: `EngineActor` (the embedded engine, or a launched SGLang server behind our client, with
weight updates from a Ray object or from disk), `RolloutWorker` (runs agent loops concurrently
against the engines; I/O only, so `num_cpus=0`), `LearnerActor` (TorchLearner + checkpoints) and
`RayEngine`, the InferenceEngine adapter that lets the agent loop call an engine actor.
Does not own: the schedule (train.py), the recipe schema (agentrl.recipe).

Fault tolerance: actors are created with `max_restarts`; engine calls are retried on a restarted
engine (`max_task_retries`), which reloads the latest published weights from disk. Rollout jobs
lost with a dead worker are resubmitted by the controller (train.py), each exactly once.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import ray
import torch

from agentrl.engine.types import GenerateOutput, GenerateRequest, SamplingParams


WRITE_INTERVAL_S = 2.0  # background weight checkpoints (embedded engines): at most one per interval


def _to_numpy(state: dict[str, torch.Tensor]) -> dict:
    """A state dict as numpy arrays where numpy has the dtype: Ray stores those zero-copy in shared
    memory, where torch tensors are pickled and unpickled (~10% of the learner's CPU per publish)."""
    return {k: v.numpy() if v.dtype != torch.bfloat16 else v for k, v in state.items()}


def _to_torch(state: dict) -> dict[str, torch.Tensor]:
    import warnings

    with warnings.catch_warnings():  # Ray's arrays are read-only views; load_state_dict only reads them
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}


def _latest_weights(weights_dir: Path) -> tuple[Path | None, int]:
    marker = weights_dir / "LATEST"
    if not marker.exists():
        return None, 0
    name = marker.read_text().strip()
    return weights_dir / name, int(name.rsplit("_", 1)[-1])


class EngineActorImpl:
    """One inference engine. backend "embedded": agentrl's engine in this process; "sglang": a real
    SGLang server launched by this actor and reached through agentrl's client; "http": an engine
    already serving at `url`."""

    def __init__(self, model_dir: str, weights_dir: str, backend: str = "embedded", dtype: str = "bfloat16",
                 max_total_tokens: int = 65536, chunk_size: int = 512, url: str | None = None,
                 sglang_python: str = "python", sglang_args: list[str] | None = None, port: int = 30000) -> None:
        self.backend, self.weights_dir = backend, Path(weights_dir)
        latest, version = _latest_weights(self.weights_dir)  # after a restart: the newest published weights
        path = str(latest or model_dir)
        self.server = None
        if backend == "embedded":
            from agentrl.engine.engine import Engine

            self.engine = Engine.from_pretrained(path, dtype=dtype, max_total_tokens=max_total_tokens,
                                                 chunk_size=chunk_size).start()
            self.engine.version = version
        else:
            from agentrl.engine.client import EngineClient

            if backend == "sglang":
                from agentrl.engine.sglang import SGLangServer, SGLangServerConfig

                self.server = SGLangServer(SGLangServerConfig(model_path=path, port=port, python=sglang_python,
                                                              extra_args=list(sglang_args or [])))
                self.server.start()
                url = self.server.base_url
            self.engine = EngineClient(url)
            self.version = version

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        return await self.engine.generate(request)

    async def generate_stream(self, requests: list[GenerateRequest]):
        """Many requests in one actor call (a Ray streaming generator): yields, each time requests
        finish, the list of their (index, output), or (index, exception) for a request that failed.
        One call per batch instead of one per request, without making a batch wait for its slowest
        request; requests that finish in the same engine step (a GRPO group) travel as one item."""
        async def one(i: int, r: GenerateRequest):
            try:
                return i, await self.engine.generate(r)
            except Exception as e:  # that request fails, not its batch
                return i, e

        pending = {asyncio.ensure_future(one(i, r)) for i, r in enumerate(requests)}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            yield [t.result() for t in done]

    def update_weights(self, state: dict, version: int, in_flight: str = "continue") -> int:
        """Embedded engines take the state dict itself (a Ray object of numpy arrays or tensors: no disk
        round trip)."""
        return self.engine.update_weights_from_state_dict(_to_torch(state), in_flight, version)

    async def update_weights_from_disk(self, path: str, version: int, in_flight: str = "continue") -> int:
        if self.backend == "embedded":
            self.engine.update_weights_from_disk(path, in_flight, version)
        else:
            await self.engine.update_weights_from_disk(path, abort_in_flight=in_flight == "abort")
        return version

    def stats(self) -> dict:
        return self.engine.stats() if self.backend == "embedded" else {}

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        if self.backend == "embedded":
            self.engine.shutdown()
        if self.server is not None:
            self.server.stop()


class RayEngine:
    """InferenceEngine over an EngineActor handle (what the agent loop sees inside a worker).

    Requests made in the same event-loop iteration (a GRPO group starting, episodes whose tool calls
    returned together) travel in one `generate_stream` actor call and come back as they finish (those
    finishing together in one stream item): a Ray call costs ~0.6 ms of CPU, which at 64 requests per
    update was a sizeable share of a 2-core machine. If the engine actor dies mid-stream, Ray runs the stream again on the restarted
    actor (`max_task_retries=-1`, as it retried a plain call); an answer already delivered is not
    delivered twice. Any error that reaches here fails the unanswered requests (their episodes end
    as engine errors), never leaves them waiting."""

    def __init__(self, actor) -> None:
        self.actor = actor
        self._queue: list[tuple[GenerateRequest, asyncio.Future]] = []

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._queue:
            loop.call_soon(self._send)  # after every request made in this iteration has queued
        self._queue.append((request, fut))
        return await fut

    def _send(self) -> None:
        batch, self._queue = self._queue, []
        asyncio.ensure_future(self._stream(batch))

    async def _stream(self, batch: list[tuple[GenerateRequest, asyncio.Future]]) -> None:
        futs = [f for _, f in batch]
        try:
            async for ref in self.actor.generate_stream.options(num_returns="streaming").remote([r for r, _ in batch]):
                for i, out in await ref:
                    if futs[i].done():  # a re-run stream repeats answers already given
                        continue
                    if isinstance(out, Exception):
                        futs[i].set_exception(out)
                    else:
                        futs[i].set_result(out)
        except Exception as e:
            for f in futs:
                if not f.done():
                    f.set_exception(e)
            return
        for f in futs:  # a stream that ended without answering a request is an engine failure
            if not f.done():
                f.set_exception(RuntimeError("engine stream ended without an answer"))


class RolloutWorkerImpl:
    """Runs agent-loop episodes for the controller: one call = one job (a list of task seeds, each a
    GRPO group). Holds no state the controller needs back except the results.

    The engines come by actor name, not handle: Ray re-runs a restarted actor's constructor with the
    arguments it was created with, and handles among them are references it does not keep alive for
    that (ray-project/ray#53727; Ray logs an error for every such actor). Names are plain strings and
    find the engines, restarted or not."""

    def __init__(self, model_dir: str, env_id: str, env_kwargs: dict, engine_names: list[str], layout,
                 simulated_tool_latency: float = 0.0) -> None:
        from transformers import AutoTokenizer

        from agentrl.env import make

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.engines = [RayEngine(ray.get_actor(name)) for name in engine_names]
        self.layout = layout
        latency = simulated_tool_latency

        def make_env():
            env = make(env_id, **env_kwargs)
            if latency > 0:  # for the async-vs-sync benchmark: a slow tool (sandbox, web) on every step
                step = env.astep

                async def slow_step(action):
                    await asyncio.sleep(latency)
                    return await step(action)

                env.astep = slow_step
            return env

        self.make_env = make_env

    async def run(self, seeds: list[int], group_size: int, sampling: SamplingParams, concurrency: int,
                  max_total_tokens: int, engine_index: int = 0):
        from agentrl.rollout import run_episodes

        engines = self.engines[engine_index % len(self.engines):] + self.engines[: engine_index % len(self.engines)]
        t0 = time.perf_counter()
        trajs = await run_episodes(engines, self.make_env, self.tok, sampling, seeds=seeds, group_size=group_size,
                                   concurrency=concurrency, layout=self.layout, max_total_tokens=max_total_tokens)
        return trajs, time.perf_counter() - t0

    def pid(self) -> int:
        return os.getpid()


class LearnerActorImpl:
    """The learner (torch or megatron-core backend) plus publishing and checkpoints (HF layout + trainer state)."""

    def __init__(self, model_dir: str, learner_cfg, weights_dir: str, threads: int = 0, seed: int = 0,
                 backend: str = "torch") -> None:
        from agentrl.model import load_pretrained

        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.model_dir = model_dir
        if backend == "megatron":
            from agentrl.learner.mcore import MegatronLearner as learner_cls
        elif backend == "torch":
            from agentrl.learner.learner import TorchLearner as learner_cls
        else:
            raise ValueError(f"unknown learner backend {backend!r} (torch | megatron)")
        self.learner = learner_cls(load_pretrained(model_dir), learner_cfg)
        self.weights_dir = Path(weights_dir)
        self._writer = None  # publish thread, started on first use
        self._last_write = -float("inf")
        self._unwritten: tuple[dict, int] | None = None  # the newest published state not yet on disk

    def train_step(self, trajs) -> dict:
        return self.learner.train_step(trajs)

    def version(self) -> int:
        return self.learner.version

    def publish(self, background: bool = False) -> tuple[dict, int, str]:
        """The weights to publish (EMA ones if `publish: ema`): the state dict (embedded engines get it
        as a Ray object), its version, and the HF checkpoint under weights/ with LATEST pointing at it
        (what SGLang servers load and what a restarted engine starts from). Without `background` the
        checkpoint is on disk when this returns. With it (embedded engines, which get the state itself),
        the state is snapshotted now and written by a writer thread, one write at a time, in version
        order, at most one per WRITE_INTERVAL_S (the newest state wins; `wait_published` writes the
        last one), so the learner starts its next update at once and does not spend a core on disk
        writes. LATEST may then lag by a few versions; a restarted engine reports its weights' version
        truthfully, so its samples are checked for staleness like any others."""
        state, version = self.learner.weights()
        return _to_numpy(state), version, self._write_async(state, version, background)

    def _write_async(self, state: dict, version: int, background: bool) -> str:
        out = self.weights_dir / f"v_{version}"
        if background and time.monotonic() - self._last_write < WRITE_INTERVAL_S:
            self._unwritten = (state, version)
            return str(out)
        self._unwritten = None
        self._last_write = time.monotonic()
        if self._writer is None:
            import concurrent.futures

            from transformers import AutoTokenizer

            self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        job = self._writer.submit(self._write_weights, state, version, out)
        if not background:
            job.result()
        return str(out)

    def wait_published(self) -> None:
        """Block until the newest published weights are on disk."""
        if self._unwritten is not None:
            self._write_async(*self._unwritten, background=False)
        if self._writer is not None:
            self._writer.submit(lambda: None).result()

    def _write_weights(self, state: dict, version: int, out: Path) -> None:
        import shutil

        from agentrl.model import save_pretrained

        save_pretrained(self.learner.model, out, tokenizer=self._tokenizer, state=state)
        tmp = self.weights_dir / "LATEST.tmp"
        tmp.write_text(out.name)
        tmp.replace(self.weights_dir / "LATEST")
        for old in self.weights_dir.glob("v_*"):  # keep the newest two
            if old.name not in (out.name, f"v_{version - 1}"):
                shutil.rmtree(old, ignore_errors=True)

    def save_checkpoint(self, path: str, extra: dict) -> str:
        from agentrl.runtime.checkpoint import save_checkpoint

        return save_checkpoint(Path(path), self.learner, self.model_dir, extra)

    def load_checkpoint(self, path: str) -> dict:
        from agentrl.runtime.checkpoint import load_checkpoint

        return load_checkpoint(Path(path), self.learner)

    def pid(self) -> int:
        return os.getpid()


def remote_classes(max_restarts: int = 3):
    """Ray actor classes. Engine and learner compute (1 CPU each); rollout workers only do I/O
    (num_cpus=0: on a 2-core machine anything else deadlocks the schedule)."""
    engine = ray.remote(num_cpus=1, max_restarts=max_restarts, max_task_retries=-1, max_concurrency=1024)(EngineActorImpl)
    worker = ray.remote(num_cpus=0, max_restarts=max_restarts, max_concurrency=64)(RolloutWorkerImpl)
    learner = ray.remote(num_cpus=1, max_restarts=0)(LearnerActorImpl)
    return engine, worker, learner
