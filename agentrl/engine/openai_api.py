"""OpenAI-compatible chat endpoint of the embedded server: ``POST /v1/chat/completions``, ``GET /v1/models``.

Owns: turning a chat-completions request (messages, tools, sampling) into one engine request through
the model's chat template, and the engine's text back into an OpenAI ``choices[0].message`` with
native ``tool_calls`` parsed from the Qwen3/Hermes ``<tool_call>`` blocks. SGLang serves the same
routes, so an evaluation written against this endpoint runs unchanged against SGLang, vLLM or a
hosted API.

Parsing rule: when every ``<tool_call>`` block in the output is well formed, the message carries them
as ``tool_calls`` (ids ``call_<n>``, arguments as a JSON string) and ``content`` is the text outside
the blocks; ``finish_reason`` is ``"tool_calls"``. When any block is malformed, nothing is parsed:
the raw text is returned as ``content`` so the caller (an environment) sees exactly what the model
wrote and can answer with an error observation.

Not supported (400): ``stream``, ``n`` > 1, ``logprobs``, ``tool_choice`` other than ``auto``/``none``.
Does not own: the native ``/generate`` API (agentrl.engine.server) or scheduling (the engine).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from agentrl.engine.types import GenerateRequest, SamplingParams
from agentrl.tools import parse_tool_calls

__all__ = ["add_routes"]

_FIELDS = {"model", "messages", "tools", "tool_choice", "temperature", "top_p", "max_tokens",
           "max_completion_tokens", "stop", "seed", "n", "stream", "logprobs", "user", "frequency_penalty",
           "presence_penalty", "parallel_tool_calls"}


class ChatRequestError(ValueError):
    """A malformed chat-completions request (answered with 400)."""


def _messages(raw: Any) -> list[dict]:
    """Validate OpenAI messages and keep what the chat template reads."""
    if not isinstance(raw, list) or not raw:
        raise ChatRequestError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ChatRequestError(f"messages[{i}] needs a role in system/user/assistant/tool")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if content is not None and not isinstance(content, str):
            raise ChatRequestError(f"messages[{i}].content must be a string, a list of text parts or null")
        msg: dict[str, Any] = {"role": m["role"], "content": content or ""}
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise ChatRequestError(f"messages[{i}].tool_calls must be a list")
            msg["tool_calls"] = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ChatRequestError(f"messages[{i}].tool_calls entries need function.name")
                args = fn.get("arguments", "{}")
                msg["tool_calls"].append({"type": "function", "function": {
                    "name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
        if m["role"] == "tool" and isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _sampling(body: dict) -> SamplingParams:
    def num(key, default, kind=(int, float)):
        v = body.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ChatRequestError(f"{key} must be a number, got {v!r}")
        return v

    max_new = body.get("max_completion_tokens")
    max_new = body.get("max_tokens") if max_new is None else max_new
    if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1):
        raise ChatRequestError(f"max_tokens must be a positive integer, got {max_new!r}")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ChatRequestError("stop must be a string or a list of strings")
    return SamplingParams.from_dict({
        "temperature": num("temperature", 1.0), "top_p": num("top_p", 1.0),
        "max_new_tokens": 128 if max_new is None else max_new,
        "stop": [stop] if isinstance(stop, str) else (stop or []), "seed": num("seed", None, int),
    })


def parse_request(body: Any, tokenizer) -> tuple[list[int], SamplingParams]:
    """The chat request -> (prompt token ids, sampling). Raises ChatRequestError."""
    if not isinstance(body, dict):
        raise ChatRequestError("request body must be a JSON object")
    unknown = set(body) - _FIELDS
    if unknown:
        raise ChatRequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if body.get("stream"):
        raise ChatRequestError("stream=true is not supported by this server")
    if body.get("n", 1) != 1:
        raise ChatRequestError("only n=1 is supported")
    if body.get("logprobs"):
        raise ChatRequestError("logprobs are not supported on /v1/chat/completions (use /generate)")
    if body.get("tool_choice", "auto") not in ("auto", "none"):
        raise ChatRequestError("tool_choice must be 'auto' or 'none'")
    tools = body.get("tools") or None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ChatRequestError("tools must be a list of function specs")
    if body.get("tool_choice") == "none":
        tools = None
    messages = _messages(body.get("messages"))
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"], _sampling(body)


def to_message(text: str) -> tuple[dict, bool]:
    """Model output text -> (OpenAI assistant message, has tool calls). See the module docstring."""
    parsed = parse_tool_calls(text)
    if parsed.errors or not parsed.calls:
        return {"role": "assistant", "content": text, "tool_calls": None}, False
    calls = [{"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
              "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
             for c in parsed.calls]
    return {"role": "assistant", "content": parsed.content.strip() or None, "tool_calls": calls}, True


async def chat_completions(request: web.Request, engine: Any, read_json) -> web.Response:
    tok = getattr(engine, "tokenizer", None)
    if tok is None:
        return web.json_response({"error": {"message": "this model has no tokenizer", "code": 400}}, status=400)
    body = await read_json(request)
    try:
        ids, sampling = parse_request(body, tok)
    except (ChatRequestError, ValueError, TypeError) as e:
        return web.json_response({"error": {"message": str(e), "code": 400}}, status=400)
    out = await engine.generate(GenerateRequest(ids, sampling))
    text = tok.decode(out.output_ids, skip_special_tokens=True)
    message, has_calls = to_message(text)
    finish = out.finish_reason.get("type")
    reason = "tool_calls" if has_calls else ("length" if finish == "length" else "stop")
    return web.json_response({
        "id": f"chatcmpl-{out.rid}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model") or str(engine.model_path),
        "choices": [{"index": 0, "message": message, "finish_reason": reason}],
        "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                  "total_tokens": out.prompt_tokens + out.completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": out.cached_tokens}},
    })


def add_routes(app: web.Application, engine_key, read_json) -> None:
    """Register the OpenAI-compatible routes on the server's app."""

    async def chat(request: web.Request) -> web.Response:
        return await chat_completions(request, request.app[engine_key], read_json)

    async def models(request: web.Request) -> web.Response:
        engine = request.app[engine_key]
        return web.json_response({"object": "list", "data": [
            {"id": str(engine.model_path), "object": "model", "owned_by": "agentrl"}]})

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
