"""Episodes against any OpenAI-compatible chat endpoint (message level, for evaluation).

Owns: `ChatClient` (``POST {base_url}/v1/chat/completions`` over aiohttp, retries with backoff on
transient failures) and `run_chat_episode`, which plays one `ToolEnv` episode with the endpoint as the
policy and returns a `ChatEpisode`. Use it to evaluate hosted models, vLLM or SGLang's OpenAI API, or
`agentrl serve`'s own ``/v1/chat/completions``.

Message mapping. The env's tools go to the endpoint as ``tools=`` (OpenAI function specs; none for an
env whose system prompt describes them instead, ``tools_in_prompt=False``, exactly as in training). A reply's native ``tool_calls`` are written back into
the env's action format (``<tool_call>{"name", "arguments"}</tool_call>`` blocks after the content), so
the env parses, validates and runs them exactly as in training; arguments that are not valid JSON
reach the env verbatim and become its usual error observation. The env's tool messages answer the
calls in order (``tool_call_id`` of the i-th call); results that match no call (a malformed block,
calls over the per-turn limit) go back as a user message, which every endpoint accepts.

Does not own: token-level episodes with logprobs and routing rows (agentrl.rollout, used for
training), the server side (agentrl.engine.openai_api).
"""

from __future__ import annotations

import asyncio
import json
import os
import traceback
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from agentrl.engine.types import SamplingParams

__all__ = ["ChatClient", "ChatEpisode", "ChatEndpointError", "run_chat_episode", "to_action"]


class ChatEndpointError(RuntimeError):
    """The endpoint answered with an error that retrying will not fix (4xx), or kept failing."""


class ChatClient:
    """Minimal async client for ``/v1/chat/completions``. ``api_key`` defaults to $OPENAI_API_KEY."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 300.0, retries: int = 3, backoff: float = 0.5):
        base = base_url.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.retries, self.backoff = model, retries, backoff
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def complete(self, messages: list[dict], tools: list[dict] | None, sampling: SamplingParams) -> dict:
        """One completion -> the response JSON. Raises ChatEndpointError."""
        body: dict[str, Any] = {"messages": messages, "temperature": sampling.temperature,
                                "max_tokens": sampling.max_new_tokens}
        if self.model:
            body["model"] = self.model
        if sampling.top_p < 1.0:
            body["top_p"] = sampling.top_p
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if tools:
            body["tools"] = tools
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        last = ""
        for attempt in range(self.retries + 1):
            try:
                async with self._session.post(self.url, json=body, headers=headers) as r:
                    text = await r.text()
                    if r.status == 200:
                        return json.loads(text)
                    last = f"HTTP {r.status}: {text[:500]}"
                    if r.status < 500 and r.status != 429:
                        raise ChatEndpointError(f"{self.url}: {last}")
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                await asyncio.sleep(self.backoff * 2 ** attempt)
        raise ChatEndpointError(f"{self.url}: gave up after {self.retries + 1} attempts ({last})")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass
class ChatEpisode:
    """One message-level episode: the env's history (its own message format), the OpenAI transcript,
    reward, status (ok / truncated / env_error / engine_error), turns and token usage."""

    history: list[dict]
    transcript: list[dict]
    reward: float
    status: str
    turns: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def to_action(message: dict) -> str:
    """An OpenAI assistant message -> the env's action text (content, then one block per tool call)."""
    parts = [message.get("content") or ""]
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        args = fn.get("arguments", "{}")
        try:
            args_json = json.dumps(json.loads(args) if isinstance(args, str) else args, ensure_ascii=False)
        except json.JSONDecodeError:
            args_json = args  # verbatim: the env reports the invalid JSON to the model
        parts.append(f'<tool_call>\n{{"name": {json.dumps(fn.get("name", ""))}, "arguments": {args_json}}}\n</tool_call>')
    return "\n".join(p for p in parts if p)


async def run_chat_episode(client: ChatClient, env, sampling: SamplingParams, *, seed: int | None = None,
                           options: dict | None = None) -> ChatEpisode:
    """Play one episode of `env` with the endpoint as the policy. Never raises for env or endpoint
    failures: they end the episode with status env_error / engine_error."""
    transcript: list[dict] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    turns, reward, status, info = 0, 0.0, "ok", {}

    def done(status_: str, **extra) -> ChatEpisode:
        return ChatEpisode(list(getattr(env, "history", [])), transcript, reward, status_, turns,
                           usage["prompt_tokens"], usage["completion_tokens"], {**info, **extra})

    try:
        obs, info = env.reset(seed=seed, options=options)
        tools = info.get("tools") or None
    except Exception:
        return done("env_error", error=traceback.format_exc(limit=3))
    transcript.extend({"role": m["role"], "content": m["content"]} for m in obs)
    info = {k: v for k, v in info.items() if k != "tools"}
    while True:
        try:
            resp = await client.complete(transcript, tools, sampling)
            message = resp["choices"][0]["message"]
        except Exception as e:
            return done("engine_error", error=f"{type(e).__name__}: {e}")
        for k in usage:
            usage[k] += int((resp.get("usage") or {}).get(k, 0))
        turns += 1
        calls = message.get("tool_calls") or []
        sent = {"role": "assistant", "content": message.get("content") or ""}
        if calls:
            sent["tool_calls"] = calls
        transcript.append(sent)
        try:
            obs, _, terminated, truncated, step_info = await env.astep(to_action(message))
        except Exception:
            return done("env_error", error=traceback.format_exc(limit=3))
        info.update(step_info)
        if terminated or truncated:
            final = step_info.get("final_reward")
            reward = float(final) if final is not None else 0.0
            return done("truncated" if truncated and not terminated else "ok")
        answered = obs[: len(calls)] if len(obs) >= len(calls) else obs
        for call, m in zip(calls, answered):
            transcript.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": m["content"]})
        for call in calls[len(answered):]:  # every call needs an answer
            transcript.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": "Error: not run"})
        rest = obs[len(answered):]
        if rest:
            transcript.append({"role": "user", "content": "\n\n".join(
                f"[{m.get('name') or 'tool'}] {m['content']}" for m in rest)})
