"""The runtime's actors. RayEngine (the agent loop's view of an engine actor) on a real local Ray cluster: requests made
together travel in one streaming call, each caller gets its own result as soon as it is ready, a bad
request fails alone, and requests in flight on a killed engine actor are answered by the restarted one. The
learner actor publishes numpy weights and leaves the newest on disk."""

import asyncio

import numpy as np
import pytest
import ray
import torch

from agentrl.engine.engine import Engine
from agentrl.engine.types import GenerateRequest, RequestError, SamplingParams
from agentrl.model.checkpoint import init_model
from agentrl.runtime.actors import RayEngine, remote_classes


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(init_model("tiny-moe", tmp_path_factory.mktemp("m") / "m", seed=0))


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


class Counting:
    """An actor handle that counts the streaming calls made through it."""

    def __init__(self, actor) -> None:
        self.actor, self.calls = actor, 0

    @property
    def generate_stream(self):
        self.calls += 1
        return self.actor.generate_stream


def requests() -> list[GenerateRequest]:
    # greedy, fp32: the same request gives the same tokens in any batch
    return [GenerateRequest([5 + i, 40 + 3 * i, 77, 101 + i], SamplingParams(temperature=0.0, max_new_tokens=n,
            ignore_eos=True), return_logprob=True, return_routed_experts=True) for i, n in enumerate([40, 2, 9, 25, 1, 14])]


def test_concurrent_requests_share_one_call_and_each_gets_its_own_result(cluster, ckpt, tmp_path):
    Actor, _, _ = remote_classes()
    actor = Actor.remote(ckpt, str(tmp_path), "embedded", "float32")
    handle = Counting(actor)
    eng = RayEngine(handle)
    reqs = requests()
    finished: list[int] = []

    async def one(i, r):
        out = await eng.generate(r)
        finished.append(i)
        return out

    async def go():
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))

    outs = asyncio.run(go())
    assert handle.calls == 1  # six requests, one actor call
    with Engine.from_pretrained(ckpt, dtype="float32") as ref:  # each request alone, in this process
        for r, out in zip(reqs, outs):
            alone = ref.generate_sync(r)
            assert out.output_ids == alone.output_ids
            assert out.completion_tokens == r.sampling.max_new_tokens
            assert out.routed_experts.shape == alone.routed_experts.shape
            assert (out.routed_experts == alone.routed_experts).all()
    # results come back as they finish, not when the batch's longest request does
    assert finished.index(4) < finished.index(0) and finished.index(1) < finished.index(3)
    ray.get(actor.shutdown.remote())


def test_a_bad_request_fails_alone(cluster, ckpt, tmp_path):
    Actor, _, _ = remote_classes()
    actor = Actor.remote(ckpt, str(tmp_path), "embedded", "float32")
    eng = RayEngine(actor)
    good = requests()[:3]
    bad = GenerateRequest([1, 2, 10 ** 6], SamplingParams(max_new_tokens=4))  # token id outside the vocabulary

    async def go():
        return await asyncio.gather(*(eng.generate(r) for r in [good[0], bad, *good[1:]]), return_exceptions=True)

    outs = asyncio.run(go())
    assert isinstance(outs[1], RequestError) and "input_ids" in str(outs[1])
    assert [o.completion_tokens for o in outs[:1] + outs[2:]] == [r.sampling.max_new_tokens for r in good]
    ray.get(actor.shutdown.remote())


def test_requests_in_flight_survive_a_killed_engine_actor(cluster, ckpt, tmp_path):
    Actor, _, _ = remote_classes(max_restarts=2)
    actor = Actor.remote(ckpt, str(tmp_path), "embedded", "float32")
    pid = ray.get(actor.pid.remote())
    eng = RayEngine(actor)
    n = 2000
    long = [GenerateRequest([7, 8, 9 + i], SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True))
            for i in range(4)]

    async def go():
        task = asyncio.gather(*(eng.generate(r) for r in long))
        while not (await actor.stats.remote())["decoded_tokens"]:
            await asyncio.sleep(0.05)  # the stream is open and the engine is decoding
        assert not task.done()
        ray.kill(actor, no_restart=False)
        return await asyncio.wait_for(task, timeout=300)

    outs = asyncio.run(go())
    assert ray.get(actor.pid.remote()) != pid  # a new process answered
    assert [o.completion_tokens for o in outs] == [n] * 4
    ray.get(actor.shutdown.remote())


def test_published_weights_are_numpy_and_the_newest_reaches_disk(ckpt, tmp_path):
    """publish(background=True) hands engines numpy arrays (zero-copy in Ray's store) and throttles disk
    writes; wait_published leaves the newest version on disk, byte for byte, with LATEST naming it."""
    from agentrl.learner.learner import LearnerConfig
    from agentrl.model.checkpoint import fuse_experts, read_state_dict
    from agentrl.runtime.actors import LearnerActorImpl, _latest_weights, _to_torch

    actor = LearnerActorImpl(ckpt, LearnerConfig(), str(tmp_path))
    published = []
    for v in (1, 2, 3):
        actor.learner.version = v
        with torch.no_grad():  # a different state each version
            next(actor.learner.model.parameters()).add_(1.0)
        state, version, _ = actor.publish(background=True)
        assert version == v and all(isinstance(a, np.ndarray) for a in state.values())
        published.append({k: a.copy() for k, a in state.items()})
    actor.wait_published()
    path, version = _latest_weights(tmp_path)
    assert version == 3
    on_disk = fuse_experts(read_state_dict(path))
    newest = _to_torch(published[-1])
    assert on_disk.keys() == newest.keys()
    for k in newest:
        assert torch.equal(on_disk[k], newest[k]), k
