"""Tests for agentrl.env / agentrl.tools and the shipped envs: gymnasium conformance (check_env),
scripted episodes reaching reward 1, tool schemas and validation, every error path as an observation,
async overlap, a fuzzed tool-call parser, the registry, and the calculator's safety."""

from __future__ import annotations

import asyncio
import json
import re
import time
import warnings
from typing import Literal, Optional

import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentrl.env import MessagesSpace, TextSpace, make, register, registered
from agentrl.tools import ParseResult, ToolArgumentsError, parse_tool_calls
from envs.calculator import CalculatorEnv, calc
from envs.kvstore import KVStoreEnv

# README example
from agentrl.env import Task, ToolEnv, tool


@tool
def word_length(word: str) -> int:
    """Count the letters in a word.

    Args:
        word: The word to measure.
    """
    return len(word)


class WordLengthEnv(ToolEnv):
    """How many letters does a random word have? The model should ask the tool, then answer."""

    tools = [word_length]
    system_prompt = "Use the tools, then reply with just the number."

    def task(self, rng, options):
        word = ["gymnasium", "tokenizer", "rollout", "advantage"][rng.integers(4)]
        return Task(messages=[{"role": "user", "content": f"How many letters are in '{word}'?"}],
                    answer=len(word))

    def reward(self, task, history, final_text):
        return float(final_text.strip() == str(task.answer))
# end README example


def call(name: str, **arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


# --------------------------------------------------------------------------------------------
# Conformance and scripted episodes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_env", [CalculatorEnv, KVStoreEnv, WordLengthEnv, lambda: make("kvstore-v0", hops=2)])
def test_check_env(make_env):
    env = make_env()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)  # no render modes
    assert not [str(w.message) for w in caught if "gymnasium" in w.filename]
    env.close()


@pytest.mark.parametrize("env_cls", [CalculatorEnv, KVStoreEnv, WordLengthEnv])
def test_reset_is_deterministic_and_fresh(env_cls):
    env = env_cls()
    obs1, info1 = env.reset(seed=7)
    obs2, info2 = env.reset(seed=7)
    assert obs1 == obs2 and info1 == info2 and obs1 is not obs2 and info1["tools"] is not info2["tools"]
    assert info1["tools"] == env.tool_schemas() and info1["task_id"]
    assert obs1 in env.observation_space
    assert '"parameters"' not in json.dumps(obs1)  # tools reach the model via the chat template only
    tasks = {json.dumps(env.reset(seed=s)[0]) for s in range(20)}
    assert len(tasks) > 3


def calculator_expr(question: str) -> str:
    patterns = [
        (r"What is (\d+) (\S) (\d+)\?", lambda a, op, b: f"{a} {op} {b}"),
        (r"has (\d+) apples and buys (\d+) bags of (\d+)", lambda a, b, c: f"{a} + {b} * {c}"),
        (r"has (\d+) boxes of (\d+) pens and sells (\d+)", lambda b, c, a: f"{b} * {c} - {a}"),
        (r"reads (\d+) pages a day for (\d+) days, then (\d+)", lambda c, b, a: f"{c} * {b} + {a}"),
    ]
    for pattern, build in patterns:
        if m := re.search(pattern, question):
            return build(*m.groups())
    raise AssertionError(question)


@pytest.mark.parametrize("seed", range(12))
def test_calculator_scripted_episode(seed):
    env = CalculatorEnv()
    obs, info = env.reset(seed=seed)
    obs, r, term, trunc, info = env.step("Let me compute. " + call("calc", expr=calculator_expr(obs[-1]["content"])))
    assert (r, term, trunc, info["tool_errors"]) == (0.0, False, False, 0)
    assert obs[0]["role"] == "tool" and obs[0]["name"] == "calc"
    obs, r, term, trunc, info = env.step(f"<think>calc said {obs[0]['content']}</think>The answer is {obs[0]['content']}.")
    assert (r, term, trunc, info["final_reward"], info["turn"]) == (1.0, True, False, 1.0, 2)
    env.reset(seed=seed)
    _, r, term, _, _ = env.step(f"The answer is {env.current_task.answer + 1}.")
    assert (r, term) == (0.0, True)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("again")


def kvstore_solver(question: str):
    """A scripted agent: one tool call per turn, each depending on the last result."""
    person = re.search(r"(\w+)'s employer", question).group(1)
    keys = json.loads((yield call("list_keys", prefix=person)))
    assert f"{person}.employer" in keys
    value = yield call("lookup", key=f"{person}.employer")
    for relation in ["city", "country", "capital"][: question_hops(question) - 1]:
        value = yield call("lookup", key=f"{value}.{relation}")
    yield f"{value}"


def question_hops(question: str) -> int:
    return 4 if "capital" in question else 3 if "which country" in question else 2


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("hops", [2, 4])
def test_kvstore_scripted_episode(seed, hops):
    env = make("kvstore-v0", hops=hops)
    obs, _ = env.reset(seed=seed)
    agent = kvstore_solver(obs[-1]["content"])
    action, turns = next(agent), 0
    while True:
        obs, r, term, trunc, info = env.step(action)
        turns += 1
        assert not trunc and info["tool_errors"] == 0
        if term:
            break
        action = agent.send(obs[0]["content"])
    assert r == 1.0 and turns == hops + 2
    if hops == 4:
        assert turns >= 5
    env.reset(seed=seed)
    assert env.step("Springfield")[1] == 0.0


def test_readme_example_episode():
    env = WordLengthEnv()
    obs, info = env.reset(seed=0)
    assert info["tools"][0]["function"]["parameters"]["properties"]["word"]["description"] == "The word to measure."
    word = re.search(r"'(\w+)'", obs[-1]["content"]).group(1)
    obs, *_ = env.step(call("word_length", word=word))
    assert env.step(obs[0]["content"])[1] == 1.0


def test_observations_render_with_chat_template():
    from agentrl.model.tokenizer import build_tokenizer

    tok = build_tokenizer()
    env = CalculatorEnv()
    obs, info = env.reset(seed=1)
    action = call("calc", expr="1 + 2")
    new, *_ = env.step(action)
    text = tok.apply_chat_template(obs + [{"role": "assistant", "content": action}] + new,
                                   tools=info["tools"], tokenize=False)
    assert '"name": "calc"' in text.split("\n</tools>")[0]
    assert "<tool_response>\n3\n</tool_response>" in text
    # what the template renders for structured assistant tool calls parses back to the same calls
    calls = [{"name": "calc", "arguments": {"expr": "1 + 2"}}, {"name": "lookup", "arguments": {"key": "é.x"}}]
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "Sure.",
                                        "tool_calls": [{"type": "function", "function": c} for c in calls]}],
                                       tokenize=False)
    res = parse_tool_calls(rendered.split("<|im_start|>assistant\n")[1].removesuffix("<|im_end|>\n"))
    assert [{"name": c.name, "arguments": c.arguments} for c in res.calls] == calls
    assert res.errors == [] and res.content.strip() == "Sure."


# --------------------------------------------------------------------------------------------
# Tool schema and validation
# --------------------------------------------------------------------------------------------

@tool
def search(query: str, limit: int, threshold: float, ids: list[int], mode: Literal["fast", "exact"] = "fast",
           language: Optional[str] = None) -> dict:
    """Search the index.

    Longer explanation that is not part of the description.

    Args:
        query: What to look for.
        limit: How many results
            to return at most.
        threshold (float): Minimum score.
        ids: Restrict to these ids.
        mode: Search mode.
        language: Optional language filter.

    Returns:
        The hits.
    """
    return {"query": query, "limit": limit}


def test_tool_schema():
    spec = search.schema()
    assert spec["type"] == "function" and spec["function"]["name"] == "search"
    assert spec["function"]["description"] == "Search the index."
    params = spec["function"]["parameters"]
    props = params["properties"]
    assert params["type"] == "object" and params["additionalProperties"] is False
    assert params["required"] == ["query", "limit", "threshold", "ids"]
    assert props["query"] == {"type": "string", "description": "What to look for."}
    assert props["limit"] == {"type": "integer", "description": "How many results to return at most."}
    assert props["threshold"]["type"] == "number" and props["threshold"]["description"] == "Minimum score."
    assert props["ids"]["type"] == "array" and props["ids"]["items"] == {"type": "integer"}
    assert props["mode"]["enum"] == ["fast", "exact"] and props["mode"]["default"] == "fast"
    assert {"type": "string"} in props["language"]["anyOf"] and {"type": "null"} in props["language"]["anyOf"]
    assert props["language"]["description"] == "Optional language filter."
    assert "title" not in json.dumps(spec)
    assert search.schema() is not search.schema() and not search.is_async
    assert search("q", 1, 0.5, []) == {"query": "q", "limit": 1}  # still a plain function


def test_tool_validation():
    ok = search.validate({"query": "x", "limit": 3, "threshold": 1, "ids": [1, 2]})
    assert ok == {"query": "x", "limit": 3, "threshold": 1.0, "ids": [1, 2], "mode": "fast", "language": None}
    cases = {
        "limit: Input should be a valid integer": {"query": "x", "limit": "many", "threshold": 1, "ids": []},
        "ids.1: Input should be a valid integer": {"query": "x", "limit": 1, "threshold": 1, "ids": [1, "b"]},
        "mode: Input should be 'fast' or 'exact'": {"query": "x", "limit": 1, "threshold": 1, "ids": [], "mode": "slow"},
        "query: Input should be a valid string": {"query": 5, "limit": 1, "threshold": 1, "ids": []},
        "colour: Extra inputs are not permitted": {"query": "x", "limit": 1, "threshold": 1, "ids": [], "colour": 1},
        "threshold: Field required": {"query": "x", "limit": 1, "ids": []},
    }
    for expected, args in cases.items():
        with pytest.raises(ToolArgumentsError) as e:
            search.validate(args)
        assert expected in str(e.value) and len(str(e.value)) < 200 and "http" not in str(e.value)
    with pytest.raises(ToolArgumentsError, match="JSON object"):
        search.validate([1])


def test_tool_decorator_forms_and_result_text():
    @tool(name="add-2", timeout=1.5)
    async def add(a: int, b: int = 2) -> list:
        """Add."""
        return [a + b]

    assert (add.name, add.timeout, add.is_async) == ("add-2", 1.5, True)
    assert add.parameters["required"] == ["a"]
    assert asyncio.run(add.call({"a": 1})) == "[3]"
    with pytest.raises(TypeError, match="type hint"):
        tool(name="f")(lambda x: x)
    with pytest.raises(ValueError, match="must match"):
        tool(name="bad name")(word_length.fn)


# --------------------------------------------------------------------------------------------
# Error paths: each is an observation and the episode goes on
# --------------------------------------------------------------------------------------------

@tool
def echo(text: str, times: int = 1) -> str:
    """Repeat text.

    Args:
        text: The text.
        times: How often.
    """
    return text * times


@tool
def boom(message: str) -> str:
    """Always fails."""
    raise RuntimeError(message)


@tool(timeout=0.2)
def slow_sync(seconds: float) -> str:
    """Sleeps in a thread."""
    time.sleep(seconds)
    return "done"


@tool(timeout=0.2)
async def slow_async(seconds: float) -> str:
    """Sleeps on the event loop."""
    await asyncio.sleep(seconds)
    return "done"


class ErrorsEnv(ToolEnv):
    tools = [echo, boom, slow_sync, slow_async]

    def task(self, rng, options):
        return Task(messages=[{"role": "user", "content": "go"}], answer="ok")

    def reward(self, task, history, final_text):
        return float(final_text == task.answer)


ERROR_CASES = [
    ('<tool_call>\n{"name": "echo", "arguments": {"text": "a"\n</tool_call>', "", "Error: invalid JSON"),
    (call("nope", x=1), "nope", "Error: unknown tool 'nope'; available: echo, boom, slow_sync, slow_async"),
    (call("echo", text=3), "echo", "Error: invalid arguments for echo: text: Input should be a valid string"),
    (call("echo"), "echo", "Error: invalid arguments for echo: text: Field required"),
    (call("echo", text="a", colour="red"), "echo", "Error: invalid arguments for echo: colour: Extra inputs"),
    (call("boom", message="kaput"), "boom", "Error: RuntimeError: kaput"),
    (call("slow_sync", seconds=2), "slow_sync", "Error: slow_sync timed out after 0.2 s"),
    (call("slow_async", seconds=2), "slow_async", "Error: slow_async timed out after 0.2 s"),
    ('<tool_call>\n{"name": "echo", "arguments": {"text": "a"}}', "", "Error: unclosed <tool_call>"),
    ('<tool_call>["echo"]</tool_call>', "", "Error: <tool_call> must hold a JSON object"),
    ('<tool_call>{"arguments": {}}</tool_call>', "", 'Error: <tool_call> is missing "name"'),
    ('<tool_call>{"name": "echo", "arguments": [1]}</tool_call>', "", 'Error: echo: "arguments" must be a JSON object'),
    ("The answer </tool_call>", "", "Error: </tool_call> without a matching <tool_call>"),
]


@pytest.mark.parametrize("action,name,prefix", ERROR_CASES)
def test_error_becomes_observation(action, name, prefix):
    env = ErrorsEnv()
    env.reset(seed=0)
    t0 = time.monotonic()
    obs, r, term, trunc, info = env.step(action)
    assert time.monotonic() - t0 < 1.5  # a timed-out tool does not hold the step
    assert len(obs) == 1 and obs[0]["role"] == "tool" and obs[0]["name"] == name
    assert obs[0]["content"].startswith(prefix), obs[0]["content"]
    assert "Traceback" not in obs[0]["content"]
    assert (r, term, trunc, info["tool_errors"]) == (0.0, False, False, 1)
    obs, *_ = env.step(call("echo", text="still alive"))
    assert obs[0]["content"] == "still alive"
    assert env.step("ok")[1:3] == (1.0, True)
    env.close()


def test_mixed_turn_keeps_order_and_limits():
    env = ErrorsEnv(max_tool_calls_per_turn=4, max_tool_output_chars=60)
    env.reset()
    action = (call("echo", text="a") + " text " + call("boom", message="x") + "<tool_call>{bad</tool_call>"
              + call("echo", text="xy", times=100) + call("echo", text="skipped") + "<tool_call>{</tool_call>" * 1000)
    obs, r, term, trunc, info = env.step(action)
    assert [m["name"] for m in obs] == ["echo", "boom", "", "echo", ""]
    assert obs[0]["content"] == "a" and obs[2]["content"].startswith("Error: invalid JSON")
    assert obs[3]["content"] == "xy" * 30 + "…[truncated 140 chars]"
    assert obs[4]["content"] == "Error: 1001 more tool calls not run (at most 4 per turn)"
    assert info["tool_errors"] == 3 and [c["ok"] for c in info["tool_calls"]] == [True, False, False, True, False]
    assert not term and not trunc
    assert env.history[-5:] == obs and env.history[-6] == {"role": "assistant", "content": action}


def test_max_turns_truncates():
    env = ErrorsEnv(max_turns=3)
    env.reset()
    for turn in range(1, 4):
        obs, r, term, trunc, info = env.step(call("nope"))
        assert (term, trunc, info["turn"]) == (False, turn == 3, turn)
    assert info["final_reward"] is None and r == 0.0
    with pytest.raises(RuntimeError):
        env.step("ok")


def test_step_inside_running_loop_points_to_astep():
    env = ErrorsEnv()
    env.reset()

    async def main():
        with pytest.raises(RuntimeError, match="astep"):
            env.step("ok")
        return await env.astep("ok")

    assert asyncio.run(main())[1:3] == (1.0, True)


def test_turn_reward_and_reward_fn_callable():
    class Shaped(ErrorsEnv):
        def turn_reward(self, task, action, results):
            return -0.1 * sum(not r.ok for r in results)

    env = Shaped(reward_fn=lambda task, history, final_text: 5.0 if len(history) == 4 else 0.0)
    env.reset()
    assert env.step(call("boom", message="x"))[1] == pytest.approx(-0.1)
    _, r, term, _, info = env.step("done")
    assert (r, term, info["final_reward"], info["turn_reward"]) == (5.0, True, 5.0, 0.0)


# --------------------------------------------------------------------------------------------
# Async: concurrent episodes overlap
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sync", [False, True])
def test_concurrent_episodes_overlap(sync):
    events: list[tuple[str, str]] = []

    if sync:
        @tool
        def wait(tag: str) -> str:
            """Block this thread."""
            events.append(("start", tag))
            time.sleep(0.3)
            events.append(("end", tag))
            return tag
    else:
        @tool
        async def wait(tag: str) -> str:
            """Sleep."""
            events.append(("start", tag))
            await asyncio.sleep(0.3)
            events.append(("end", tag))
            return tag

    class WaitEnv(ErrorsEnv):
        tools = [wait]

    async def episode(tag):
        env = WaitEnv()
        env.reset()
        obs, *_ = await env.astep(call("wait", tag=tag))
        assert obs[0]["content"] == tag
        return (await env.astep("ok"))[1]

    async def main():
        return await asyncio.gather(episode("a"), episode("b"))

    assert asyncio.run(main()) == [1.0, 1.0]
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["start", "start"], events  # both tools started before either finished


# --------------------------------------------------------------------------------------------
# parse_tool_calls
# --------------------------------------------------------------------------------------------

def test_parse_examples():
    text = ('I will call. <tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call> and '
            '<tool_call>{"name": "b", "arguments": "{\\"y\\": [2]}"}</tool_call> end')
    res = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in res.calls] == [("a", {"x": 1}), ("b", {"y": [2]})]
    assert res.errors == [] and res.content == "I will call.  and  end"
    assert res.calls[0].raw == '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'
    assert parse_tool_calls('<tool_call>{"name": "a"}</tool_call>').calls[0].arguments == {}
    nested = parse_tool_calls('<tool_call> x <tool_call>{"name": "a", "arguments": {}}</tool_call>')
    assert nested.errors == ["<tool_call> opened again before </tool_call>"] and nested.calls[0].name == "a"
    assert parse_tool_calls('<tool_call>{"name": 3}</tool_call>').errors == ['"name" must be a string, got number']
    assert "not valid JSON" in parse_tool_calls('<tool_call>{"name": "a", "arguments": "{x"}</tool_call>').errors[0]
    assert "invalid JSON" in parse_tool_calls("<tool_call>" + "[" * 100_000 + "</tool_call>").errors[0]
    assert "invalid JSON" in parse_tool_calls('<tool_call>{"name": "a", "arguments": {"n": ' + "9" * 5000
                                              + "}}</tool_call>").errors[0]
    assert parse_tool_calls("plain answer") == ParseResult(content="plain answer")


@pytest.mark.parametrize("text", [
    "<tool_call>" * 200_000, "</tool_call>" * 200_000, "<tool_call>{" * 200_000,
    "<tool_call></tool_call>" * 100_000, "<tool_" * 400_000, "x" * 3_000_000,
    "<tool_call>" + '{"name": "a", "arguments": {"s": "' + "\\\\" * 500_000 + '"}}</tool_call>',
])
def test_parse_is_linear_on_huge_inputs(text):
    t0 = time.perf_counter()
    res = parse_tool_calls(text)
    assert time.perf_counter() - t0 < 3.0  # linear: milliseconds; quadratic would take minutes
    assert isinstance(res, ParseResult)


def _check_result(res):
    assert isinstance(res, ParseResult)
    assert all(isinstance(c.name, str) and c.name and isinstance(c.arguments, dict) for c in res.calls)
    assert all(isinstance(e, str) and 0 < len(e) < 200 for e in res.errors)
    assert len(res.items) == len(res.calls) + len(res.errors)


FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_call", "tool_call>", "</tool_", "\n", "{", "}", "[", "]",
             '"name"', '"arguments"', ":", ",", '"calc"', '"{\\"x\\": 1}"', "null", "1", '"', "\\", "{}",
             '{"name": "calc", "arguments": {"expr": "1+2"}}', '{"name": 5}', '{"arguments": {}}']


@settings(max_examples=1000, deadline=None)
@given(st.text())
def test_fuzz_arbitrary_text(text):
    _check_result(parse_tool_calls(text))


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=40))
def test_fuzz_near_misses(parts):
    text = "".join(parts)
    res = parse_tool_calls(text)
    _check_result(res)
    if _no_tags(text):  # text without tags is all content
        assert res.items == [] and res.content == text


def _no_tags(s: str) -> bool:
    return "<tool_call>" not in s and "</tool_call>" not in s


safe_text = st.text(max_size=30).filter(_no_tags)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | safe_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(safe_text, inner, max_size=3),
    max_leaves=6)
valid_call = st.tuples(st.text(min_size=1, max_size=20).filter(_no_tags),
                       st.dictionaries(safe_text, json_values, max_size=3),
                       st.sampled_from(["hermes", "compact", "string_args", "ascii"]))


def _render(name, arguments, style):
    if style == "hermes":
        return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)}\n</tool_call>'
    if style == "compact":
        return f'<tool_call>{json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"))}</tool_call>'
    if style == "string_args":
        return f'<tool_call> {json.dumps({"name": name, "arguments": json.dumps(arguments)})} </tool_call>'
    return f'<tool_call>\n{json.dumps({"arguments": arguments, "name": name})}\n</tool_call>'


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(safe_text, valid_call), max_size=4), safe_text)
def test_fuzz_round_trip(pieces, tail):
    text, blocks = "", []
    for filler, (name, arguments, style) in pieces:
        block = _render(name, arguments, style)
        text += filler + block
        blocks.append((name, arguments, block))
    text += tail
    res = parse_tool_calls(text)
    assert res.errors == []
    assert [(c.name, c.arguments, c.raw) for c in res.calls] == blocks
    assert res.content == "".join(f for f, _ in pieces) + tail


def test_spaces():
    text, msgs = TextSpace(max_length=50, seed=3), MessagesSpace(seed=3)
    samples = [text.sample() for _ in range(50)]
    assert all(s in text for s in samples) and len(set(samples)) > 10
    again = TextSpace(max_length=50, seed=3)
    assert [again.sample() for _ in range(50)] == samples
    assert all(msgs.sample() in msgs for _ in range(50))
    assert "x" * 51 not in text and 5 not in text
    assert [{"role": "bot", "content": "x"}] not in msgs and [{"role": "user", "content": 1}] not in msgs
    assert [{"role": "user", "content": "x", "extra": 1}] not in msgs and "x" not in msgs


# --------------------------------------------------------------------------------------------
# Registry and reward_fn resolution
# --------------------------------------------------------------------------------------------

def always_one(task, history, final_text):
    return 1.0


def test_registry():
    assert {"calculator-v0", "kvstore-v0"} <= set(registered())
    assert isinstance(make("calculator-v0"), CalculatorEnv)
    env = make("envs.calculator:CalculatorEnv", max_turns=4)
    assert isinstance(env, CalculatorEnv) and env.max_turns == 4
    assert make("kvstore-v0", hops=3).hops == 3
    register("word-length-v0", WordLengthEnv, max_turns=2)
    assert make("word-length-v0").max_turns == 2 and make("word-length-v0", max_turns=5).max_turns == 5
    with pytest.raises(ValueError, match="calculator-v0, kvstore-v0"):
        make("calculater-v0")
    with pytest.raises(ValueError, match="cannot import module 'envs.nope'"):
        make("envs.nope:X")
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        make("envs.calculator:Nope")
    with pytest.raises(TypeError, match="not a ToolEnv"):
        make("envs.calculator:calc")


def test_reward_fn_by_path():
    env = CalculatorEnv(reward_fn=f"{__name__}:always_one")
    env.reset(seed=0)
    assert env.step("no idea")[1] == 1.0
    with pytest.raises(ValueError, match="no attribute 'missing'"):
        CalculatorEnv(reward_fn=f"{__name__}:missing")
    with pytest.raises(ValueError, match="module.path:name"):
        CalculatorEnv(reward_fn="no_colon")
    with pytest.raises(TypeError, match="callable"):
        CalculatorEnv(reward_fn=f"{__name__}:FRAGMENTS")


# --------------------------------------------------------------------------------------------
# calc safety
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr,message", [
    ("__import__('os').system('touch /tmp/agentrl_pwned')", "Call is not allowed"),
    ("().__class__.__bases__", "Attribute is not allowed"),
    ("2**10**10", "Pow is not allowed"),
    ("9" * 30 + "*" + "9" * 40, "too large"),
    ("1" * 201, "longer than 200"),
    ("x + 1", "Name is not allowed"),
    ("1.5 + 1", "Constant is not allowed"),
    ("[1, 2]", "List is not allowed"),
    ("1 +", "not a valid expression"),
    ("(" * 150 + "1" + ")" * 49, "not a valid expression"),
    ("1 / (2 - 2)", "division by zero"),
])
def test_calc_rejects(expr, message):
    with pytest.raises((ValueError, ZeroDivisionError), match=re.escape(message)):
        calc(expr)
    env = CalculatorEnv()
    env.reset(seed=0)
    obs, _, term, _, info = env.step(call("calc", expr=expr))
    assert obs[0]["content"].startswith("Error: ") and not term and info["tool_errors"] == 1


def test_calc_values():
    assert calc("17 + 3 * 12") == "53" and calc("7 / 2") == "3.5" and calc("-(4 - 10) × 2") == "12"
    assert calc("((1)) + -2") == "-1" and calc("10 ÷ 4") == "2.5" and calc("2 − 5") == "-3"
