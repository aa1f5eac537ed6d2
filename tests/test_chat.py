"""OpenAI-compatible chat: our server's /v1/chat/completions and message-level evaluation episodes.

Our server runs the real embedded engine. The one small aiohttp app below stands in for a hosted
OpenAI-compatible API (none is reachable here): it answers calculator tasks with native tool calls,
so the message mapping of agentrl.chat is tested against the wire format such APIs use.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from transformers import AutoTokenizer

from agentrl.chat import ChatClient, run_chat_episode, to_action
from agentrl.engine.engine import Engine
from agentrl.engine.openai_api import to_message
from agentrl.engine.server import create_app
from agentrl.engine.types import GenerateRequest, SamplingParams
from agentrl.env import make
from agentrl.evaluate import evaluate
from agentrl.model.checkpoint import init_model
from agentrl.recipe import parse_recipe
from agentrl.tools import parse_tool_calls
from test_server_client import serving

MESSAGES = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 12 + 30?"}]
TOOLS = make("calculator-v0").tool_schemas()
SEEN = web.AppKey("seen", list)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_model("tiny-moe", tmp_path_factory.mktemp("chat") / "m", seed=0)


@pytest.fixture(scope="module")
def engine(ckpt):
    eng = Engine.from_pretrained(str(ckpt), dtype="float32", max_total_tokens=8192).start()
    yield eng
    eng.shutdown()


async def _post(url: str, body) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        return r.status, await r.json()


def test_chat_completions_renders_the_template_and_matches_generate(engine, ckpt):
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = tok(tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]

    async def main():
        async with serving(create_app(engine)) as base:
            status, body = await _post(base + "/v1/chat/completions", {
                "model": "x", "messages": MESSAGES, "tools": TOOLS, "temperature": 0, "max_tokens": 12})
            direct = await engine.generate(GenerateRequest(ids, SamplingParams(temperature=0.0, max_new_tokens=12)))
            async with aiohttp.ClientSession() as sess, sess.get(base + "/v1/models") as models:
                return status, body, direct, models.status

    status, body, direct, models_status = asyncio.run(main())
    assert status == 200 and models_status == 200
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == len(direct.output_ids)
    msg = body["choices"][0]["message"]
    # the same greedy tokens as a native request on the same prompt, parsed by the documented rule
    expected, has_calls = to_message(tok.decode(direct.output_ids, skip_special_tokens=True))
    assert (msg["content"], bool(msg["tool_calls"])) == (expected["content"], has_calls)
    assert body["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("bad", [
    {"messages": MESSAGES, "stream": True}, {"messages": MESSAGES, "n": 2}, {"messages": []},
    {"messages": [{"role": "robot", "content": "x"}]}, {"messages": MESSAGES, "max_tokens": 0},
    {"messages": MESSAGES, "frobnicate": 1}, {"messages": MESSAGES, "tool_choice": "required"},
])
def test_bad_chat_requests_are_400_and_the_server_keeps_serving(engine, bad):
    async def main():
        async with serving(create_app(engine)) as base:
            bad_status, err = await _post(base + "/v1/chat/completions", bad)
            ok_status, _ = await _post(base + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
            return bad_status, err, ok_status

    bad_status, err, ok_status = asyncio.run(main())
    assert bad_status == 400 and err["error"]["message"] and ok_status == 200


def test_tool_call_text_maps_to_native_calls_and_back():
    text = ('Let me compute.\n<tool_call>\n{"name": "calc", "arguments": {"expr": "12 + 30"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "calc", "arguments": {"expr": "2 * 3"}}\n</tool_call>')
    msg, has_calls = to_message(text)
    assert has_calls and msg["content"] == "Let me compute."
    assert [json.loads(c["function"]["arguments"]) for c in msg["tool_calls"]] == [{"expr": "12 + 30"}, {"expr": "2 * 3"}]
    back = parse_tool_calls(to_action(msg))
    assert [(c.name, c.arguments) for c in back.calls] == [("calc", {"expr": "12 + 30"}), ("calc", {"expr": "2 * 3"})]
    # one malformed block: nothing is parsed, the raw text goes back so the env reports the error
    broken = text.replace('"2 * 3"}}', '"2 * 3"}')
    msg, has_calls = to_message(broken)
    assert not has_calls and msg["content"] == broken and msg["tool_calls"] is None
    # invalid JSON arguments from an API reach the env verbatim
    action = to_action({"content": None, "tool_calls": [{"function": {"name": "calc", "arguments": "{bad"}}]})
    assert parse_tool_calls(action).errors and not parse_tool_calls(action).calls


def _solver_app(bad_arguments: bool = False) -> web.Application:
    """A stand-in hosted API that solves calculator tasks with native tool calls (see module docstring)."""
    seen: list[list[dict]] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        msgs = body["messages"]
        seen.append(msgs)
        last = msgs[-1]
        if last["role"] == "user" and last["content"].startswith("What is"):
            a, op, b = re.match(r"What is (\d+) (\S) (\d+)\?", last["content"]).groups()
            args = "{bad" if bad_arguments and len(seen) == 1 else json.dumps(
                {"expr": f"{a} {dict(zip('+−×', '+-*'))[op]} {b}"})
            message = {"role": "assistant", "content": None,
                       "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": args}}]}
        elif last["role"] == "tool" and not last["content"].startswith("Error"):
            assert last["tool_call_id"] == msgs[-2]["tool_calls"][0]["id"]
            message = {"role": "assistant", "content": f"The answer is {last['content']}."}
        else:  # the error observation: retry with valid arguments
            q = next(m["content"] for m in msgs if m["role"] == "user")
            a, op, b = re.match(r"What is (\d+) (\S) (\d+)\?", q).groups()
            message = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_2", "type": "function",
                       "function": {"name": "calc", "arguments": json.dumps({"expr": f"{a} {dict(zip('+−×', '+-*'))[op]} {b}"})}}]}
        return web.json_response({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 10, "completion_tokens": 5}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app[SEEN] = seen
    return app


def test_message_level_episode_with_native_tool_calls():
    env_kwargs = {"compact": False, "digits": 2, "word_problems": False}

    async def main(bad):
        app = _solver_app(bad)
        async with serving(app) as base:
            client = ChatClient(base + "/v1")
            eps = [await run_chat_episode(client, make("calculator-v0", **env_kwargs), SamplingParams(), seed=s)
                   for s in range(4)]
            await client.close()
        return eps, app[SEEN]

    eps, seen = asyncio.run(main(False))
    assert [e.reward for e in eps] == [1.0] * 4 and all(e.turns == 2 and e.status == "ok" for e in eps)
    assert seen[0][-1]["role"] == "user" and eps[0].completion_tokens == 10
    eps, _ = asyncio.run(main(True))  # invalid JSON arguments: an error observation, then a retry
    first = eps[0]
    assert first.reward == 1.0 and first.turns == 3
    assert first.history[3]["role"] == "tool" and first.history[3]["content"].startswith("Error")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_agentrl_eval_against_agentrl_serve_openai_api(tmp_path, ckpt):
    """The whole path: `agentrl serve` in its own process, `agentrl eval --api openai` against it."""
    port = _free_port()
    agentrl = str(Path(sys.executable).with_name("agentrl"))
    server = subprocess.Popen([agentrl, "serve", "--model", str(ckpt), "--port", str(port), "--dtype", "float32"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(120):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        r = parse_recipe({"name": "oa", "model": {"path": str(ckpt)}, "runtime": {"steps": 1},
                          "env": {"id": "calculator-v0", "kwargs": {"digits": 2}},
                          "rollout": {"max_new_tokens": 16}, "eval": {"episodes": 6},
                          "output": {"dir": str(tmp_path / "runs")}})
        summary = evaluate(r, base_url=f"http://127.0.0.1:{port}", api="openai", progress=False)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert summary["episodes"] == 6 and summary["status"]["engine_error"] == 0
    assert summary["status"]["ok"] + summary["status"]["truncated"] == 6
    assert summary["generated_tokens_mean"] > 0 and summary["prompt_tokens_mean"] > 0
    lines = (tmp_path / "runs" / "oa" / "eval" / "episodes_model.jsonl").read_text().splitlines()
    hist = json.loads(lines[0])["history"]
    assert hist[0]["role"] == "system" and hist[2]["role"] == "assistant"
