"""The agent loop with the real embedded engine: token exactness, row coverage, concurrency, failures."""

import asyncio

import gymnasium
import numpy as np
import pytest
from transformers import AutoTokenizer

from agentrl.engine.engine import Engine
from agentrl.engine.types import GenerateRequest, SamplingParams
from agentrl.env import make
from agentrl.model import load_pretrained
from agentrl.model.checkpoint import init_model
from agentrl.rollout import prompt_ids, render_continuation, run_episode, run_episodes
from agentrl.routing import RoutingLayout
from agentrl.trajectory import TrajectoryError

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=12, seed=0)


class ChatterEnv(gymnasium.Env):
    """A real multi-turn env that never ends early: every turn gets a user reply, for `turns` turns.
    (A random model emits no tool calls, so tool envs end after one turn.)"""

    def __init__(self, turns: int = 6, fail_at: int | None = None):
        self.turns, self.fail_at, self.t = turns, fail_at, 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return [{"role": "user", "content": f"Tell me about number {seed}."}], {"tools": [], "task_id": str(seed)}

    async def astep(self, action):
        self.t += 1
        if self.fail_at == self.t:
            raise RuntimeError("the environment crashed")
        await asyncio.sleep(0)
        done = self.t >= self.turns
        return [{"role": "user", "content": f"turn {self.t}: and then? 12+{self.t}"}], float(done), done, False, {}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_model("tiny-moe", tmp_path_factory.mktemp("rollout") / "tiny", seed=0, initializer_range=0.08)


@pytest.fixture(scope="module")
def tok(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


class Recorder:
    """Passes requests to the real engine and keeps what went in and came out."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    async def generate(self, req):
        out = await self.engine.generate(req)
        self.calls.append((list(req.input_ids), out))
        return out


def test_token_exactness_and_rows_over_six_turns(ckpt, tok):
    layout = RoutingLayout.from_config(load_pretrained(ckpt).config)
    with Engine.from_pretrained(ckpt, dtype="float32") as eng:
        rec = Recorder(eng)
        env = ChatterEnv(turns=6)
        traj = asyncio.run(run_episode(rec, env, tok, SAMPLING, seed=7, layout=layout))
        traj.validate(layout)
        assert traj.status == "ok" and traj.turns == 6 and traj.reward == 1.0
        ids = traj.tokens.tolist()
        # every request is exactly the trajectory so far; every output is appended as ids, unchanged
        for i, (req_ids, out) in enumerate(rec.calls):
            n = len(req_ids)
            assert ids[:n] == req_ids
            assert ids[n: n + len(out.output_ids)] == out.output_ids
            assert traj.loss_mask[n: n + len(out.output_ids)].all()
            np.testing.assert_array_equal(traj.logprobs[n: n + len(out.output_ids)], np.float32(out.output_logprobs))
            if i + 1 < len(rec.calls):  # what follows is the env's text, tokenized once, loss-masked
                nxt = len(rec.calls[i + 1][0])
                assert not traj.loss_mask[n + len(out.output_ids): nxt].any()
        assert traj.loss_mask.sum() == sum(len(o.output_ids) for _, o in rec.calls)
        first_prompt = tok(tok.apply_chat_template(ChatterEnv().reset(seed=7)[0], tokenize=False,
                                                   add_generation_prompt=True))["input_ids"]
        assert ids[: len(first_prompt)] == first_prompt and traj.prompt_len == len(first_prompt)
        # rows cover 100% of fed tokens, stitched from per-turn increments ...
        assert len(traj.routing) == len(ids) - 1
        starts = [o.routed_experts_start_len for _, o in rec.calls]
        assert starts[0] == 0 and all(b > a for a, b in zip(starts, starts[1:]))
        # ... and equal one full-sequence request's rows computed from scratch (cache flushed)
        eng.flush_cache()
        full = eng.generate_sync(GenerateRequest(ids, SamplingParams(max_new_tokens=0), return_routed_experts=True))
        assert full.cached_tokens == 0
        assert (full.routed_experts == traj.routing.experts).all()


def test_continuation_text_matches_the_chat_template(tok):
    msgs = [{"role": "user", "content": "hi"}]
    reply = "hello"
    new = [{"role": "tool", "name": "calc", "content": "42"}]
    whole = tok.apply_chat_template(msgs + [{"role": "assistant", "content": reply}] + new, tokenize=False,
                                    add_generation_prompt=True)
    head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # the model emits its reply then <|im_end|> (closed); the env appends the rest of the template
    assert head + reply + tok.eos_token + render_continuation(tok, new, closed=True) == whole
    assert head + reply + render_continuation(tok, new, closed=False) == whole


def test_groups_share_the_prompt_prefix_and_failures_stay_local(ckpt, tok):
    layout = RoutingLayout.from_config(load_pretrained(ckpt).config)
    with Engine.from_pretrained(ckpt, dtype="float32") as eng:
        made = []

        def make_env():
            made.append(ChatterEnv(turns=2, fail_at=2 if len(made) == 5 else None))
            return made[-1]

        trajs = asyncio.run(run_episodes(eng, make_env, tok, SAMPLING, seeds=[1, 2, 3], group_size=4,
                                         concurrency=8, layout=layout))
        assert eng.counters["cached_tokens"] > 0  # group members reused the shared prompt's KV
    assert len(trajs) == 12 and [t.group_id for t in trajs] == [str(s) for s in (1, 2, 3) for _ in range(4)]
    assert sorted(t.status for t in trajs).count("env_error") == 1
    for t in trajs:
        if t.status == "ok":
            t.validate(layout)
            assert t.turns == 2
    group = [t for t in trajs if t.group_id == "1" and t.status == "ok"]
    assert len({t.tokens[t.prompt_len:].tobytes() for t in group}) > 1  # samples in a group differ


def test_engine_failure_is_an_engine_error_episode(ckpt, tok):
    eng = Engine.from_pretrained(ckpt, dtype="float32")  # never started: every request fails
    traj = asyncio.run(run_episode(eng, ChatterEnv(), tok, SAMPLING, seed=1))
    assert traj.status == "engine_error" and "not started" in traj.info["error"]


def test_calculator_episodes_with_the_real_engine(ckpt, tok):
    layout = RoutingLayout.from_config(load_pretrained(ckpt).config)
    with Engine.from_pretrained(ckpt, dtype="bfloat16") as eng:
        trajs = asyncio.run(run_episodes(eng, lambda: make("calculator-v0"), tok, SAMPLING, seeds=range(4),
                                         group_size=2, layout=layout))
    for t in trajs:
        assert t.status in ("ok", "truncated")
        t.validate(layout)
        assert t.reward in (0.0, 1.0)
        assert t.prompt_len > 0 and "<tools>" in tok.decode(t.tokens[: t.prompt_len].tolist())


def test_validation_rejects_broken_trajectories(ckpt, tok):
    layout = RoutingLayout.from_config(load_pretrained(ckpt).config)
    with Engine.from_pretrained(ckpt, dtype="float32") as eng:
        t = asyncio.run(run_episode(eng, ChatterEnv(turns=2), tok, SAMPLING, seed=3, layout=layout))
    t.validate(layout)
    bad = [
        ("length_mismatch", dict(logprobs=t.logprobs[:-1])),
        ("versions", dict(versions=np.where(t.loss_mask, 5 - np.cumsum(t.loss_mask), -1))),
        ("logprobs", dict(logprobs=np.where(t.loss_mask, 0.5, 0.0).astype(np.float32))),
    ]
    import dataclasses

    for reason, change in bad:
        with pytest.raises(TrajectoryError) as e:
            dataclasses.replace(t, **change).validate(layout)
        assert e.value.reason == reason
    short_rows = dataclasses.replace(t.routing, experts=t.routing.experts[:-1], versions=t.routing.versions[:-1])
    with pytest.raises(TrajectoryError, match="routing"):
        dataclasses.replace(t, routing=short_rows).validate(layout)
    dup = t.routing.experts.copy()
    dup[3, 1] = [4, 4]
    with pytest.raises(TrajectoryError, match="duplicate"):
        dataclasses.replace(t, routing=dataclasses.replace(t.routing, experts=dup)).validate(layout)


def test_episodes_aborted_by_a_weight_update_are_played_again(ckpt, tok):
    layout = RoutingLayout.from_config(load_pretrained(ckpt).config)
    with Engine.from_pretrained(ckpt, dtype="float32") as eng:
        state = load_pretrained(ckpt).state_dict()

        async def go():
            task = asyncio.ensure_future(run_episodes(
                eng, lambda: ChatterEnv(turns=3), tok, SamplingParams(max_new_tokens=40, ignore_eos=True),
                seeds=[1, 2], group_size=2, layout=layout))
            while eng.counters["decoded_tokens"] < 20:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(eng.update_weights_from_state_dict, state, "abort")
            return await task

        trajs = asyncio.run(go())
    assert eng.counters["aborted"] > 0
    assert all(t.status == "ok" for t in trajs)
    assert max(t.info["attempts"] for t in trajs) >= 2
    for t in trajs:
        t.validate(layout)
        assert set(t.versions[t.loss_mask].tolist()) == {1}  # replayed wholly on the new weights


def test_prompt_ids_are_the_templated_prompt_for_every_messages_and_tools(tok):
    """The memoized opening of an episode equals a fresh render + tokenization, per (messages, tools)."""
    tools = [{"type": "function", "function": {"name": "calc", "description": "arithmetic",
                                                "parameters": {"type": "object", "properties": {}}}}]

    def fresh(messages, tools):
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        return tuple(tok(text, add_special_tokens=False)["input_ids"])

    cases = [([{"role": "user", "content": "What is 2 + 3?"}], None),
             ([{"role": "user", "content": "What is 2 + 3?"}], tools),
             ([{"role": "user", "content": "What is 2 + 4?"}], None)]
    first = [prompt_ids(tok, m, t) for m, t in cases]
    again = [prompt_ids(tok, m, t) for m, t in cases]  # served from the memo
    assert first == again == [fresh(m, t) for m, t in cases]
    assert len(set(first)) == 3  # tools and content each change the prompt
