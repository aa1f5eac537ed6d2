"""The environment API: ``ToolEnv``, a ``gymnasium.Env`` for multi-turn tool-calling episodes.

Owns:
  * ``ToolEnv`` -- subclasses set ``tools`` and implement ``task`` (the episode's messages and answer)
    and ``reward``; the base class parses the model's tool calls, runs them, turns every failure
    (malformed call, unknown tool, bad arguments, a raising or slow tool) into an error observation,
    and enforces the limits (turns, calls per turn, output size).
  * ``Task`` -- what ``task`` returns.
  * ``TextSpace`` / ``MessagesSpace`` -- the action (any unicode text) and observation (chat messages)
    spaces, so ``gymnasium.utils.env_checker.check_env`` runs on every env.
  * ``register`` / ``make`` -- a small registry of env ids and ``"module.path:ClassName"`` specs.

Does not own: tokenization or the chat template (the agent loop, agentrl.rollout, renders the
messages returned here, passing ``info["tools"]`` as the template's ``tools=``), tool schemas and
call parsing (agentrl.tools).

Episode protocol. ``reset`` returns the initial messages (an optional system prompt without any
tool text, then the task's messages). Each ``step(action)`` takes the assistant's raw text for one
turn and returns the messages to append: one ``{"role": "tool", "name", "content"}`` per call, in
text order (a malformed block gets ``name=""``; every failure's content starts with ``"Error: "``);
blocks past ``max_tool_calls_per_turn`` are not run and share one error message.
A turn with no tool call and no malformed block is the final answer: the episode terminates with
``reward(task, history, final_text)``; so does a turn in which a tool called ``self.end_episode(text)``
(an ``answer`` / ``submit`` tool), with ``final_text = text``. ``max_turns`` reached without an answer -> truncated, no final
reward. The step reward is ``turn_reward + final reward``; ``info["final_reward"]`` holds the latter
(None until the episode terminates). Calls in one turn run one after another, in order, so stateful
tools stay deterministic.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import importlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium
import numpy as np

from agentrl.tools import Tool, ToolArgumentsError, ToolCall, ToolTimeoutError, parse_tool_calls, tool

__all__ = ["ToolEnv", "Task", "ToolResult", "TextSpace", "MessagesSpace", "register", "make", "registered",
           "tool", "Tool"]

Message = dict[str, str]
ROLES = ("system", "user", "assistant", "tool")


# --------------------------------------------------------------------------------------------
# Spaces
# --------------------------------------------------------------------------------------------

_SAMPLE_CHARS = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,:;!?{}[]\"'<>/\\-+*=_\n\té中🙂—")
_SAMPLE_SNIPPETS = ("<tool_call>", "</tool_call>", '{"name": "', '", "arguments": {', "}}", "The answer is ", "42")


def _sample_text(rng: np.random.Generator, max_len: int) -> str:
    """Short random text mixing unicode characters with tool-call fragments."""
    parts: list[str] = []
    for _ in range(int(rng.integers(0, 8))):
        if rng.random() < 0.3:
            parts.append(_SAMPLE_SNIPPETS[int(rng.integers(len(_SAMPLE_SNIPPETS)))])
        else:
            parts.append("".join(rng.choice(_SAMPLE_CHARS, size=int(rng.integers(1, 12)))))
    return "".join(parts)[:max_len]


class TextSpace(gymnasium.Space[str]):
    """Any unicode string of at most ``max_length`` characters (gymnasium's ``Text`` only holds a fixed
    charset). ``sample()`` is seeded by the space's seed and mixes plain text, unicode and tool-call
    fragments (a complete call, cut tags, broken JSON) to exercise an env's error paths."""

    def __init__(self, max_length: int = 1_000_000, seed: int | np.random.Generator | None = None):
        self.max_length = int(max_length)
        super().__init__(shape=None, dtype=None, seed=seed)

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        if mask is not None or probability is not None:
            raise NotImplementedError("TextSpace.sample supports neither mask nor probability")
        rng = self.np_random
        kind = int(rng.integers(4))
        text = _sample_text(rng, 200)
        if kind == 1:  # a complete call to a random (probably unknown) tool
            text += '<tool_call>\n{"name": "' + _sample_text(rng, 8) + '", "arguments": {}}\n</tool_call>'
        elif kind == 2:  # an unclosed call
            text += "<tool_call>\n{" + _sample_text(rng, 20)
        return text[: self.max_length]

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"TextSpace(max_length={self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, TextSpace) and other.max_length == self.max_length


class MessagesSpace(gymnasium.Space[list]):
    """A list of chat messages: dicts with ``role`` (system/user/assistant/tool) and ``content`` (str),
    and optionally ``name`` (str; tool messages carry the tool's name). Nothing else. ``sample()`` is
    seeded by the space's seed."""

    def __init__(self, max_messages: int = 4096, seed: int | np.random.Generator | None = None):
        self.max_messages = int(max_messages)
        super().__init__(shape=None, dtype=None, seed=seed)

    def sample(self, mask: Any = None, probability: Any = None) -> list[Message]:
        if mask is not None or probability is not None:
            raise NotImplementedError("MessagesSpace.sample supports neither mask nor probability")
        rng = self.np_random
        out = []
        for _ in range(int(rng.integers(1, min(5, self.max_messages + 1)))):
            role = ROLES[int(rng.integers(len(ROLES)))]
            msg = {"role": role, "content": _sample_text(rng, 200)}
            if role == "tool":
                msg["name"] = _sample_text(rng, 8)
            out.append(msg)
        return out

    def contains(self, x: Any) -> bool:
        return isinstance(x, list) and len(x) <= self.max_messages and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            and set(m) <= {"role", "content", "name"} and isinstance(m.get("name", ""), str) for m in x)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"MessagesSpace(max_messages={self.max_messages})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, MessagesSpace) and other.max_messages == self.max_messages


# --------------------------------------------------------------------------------------------
# ToolEnv
# --------------------------------------------------------------------------------------------

@dataclass
class Task:
    """One episode's problem. ``messages``: the opening messages (usually one user message; no system
    message unless the task needs its own). ``answer`` and ``info``: whatever ``reward`` needs.
    ``id``: a stable id for logs and GRPO groups (default: a hash of the messages)."""

    messages: list[Message]
    answer: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass
class ToolResult:
    """The outcome of one tool-call block in a turn (what ``turn_reward`` sees). ``ok`` is False for
    every error observation; ``name`` is "" and ``arguments`` None for a malformed block."""

    name: str
    arguments: dict[str, Any] | None
    content: str
    ok: bool


RewardFn = Callable[[Task, list[Message], str], float]


class ToolEnv(gymnasium.Env[list[Message], str]):
    """Base class of multi-turn tool-calling envs. Subclass it, set ``tools`` (and ``system_prompt``),
    implement ``task`` and ``reward``; optionally ``turn_reward``. See the module docstring.

    Args:
        max_turns: assistant turns before the episode is truncated.
        max_tool_calls_per_turn: tool-call blocks (well formed or not) handled per turn; the rest are
            not run and get one error message.
        max_tool_output_chars: longer tool output is cut and marked ``…[truncated N chars]``.
        tool_timeout: seconds a tool may run unless it sets its own ``timeout`` (None = unbounded).
        reward_fn: replaces ``self.reward``: a callable ``(task, history, final_text) -> float`` or a
            ``"module.path:function"`` string.
    """

    tools: list[Tool] = []
    system_prompt: str | None = None
    tools_in_prompt: bool = True  # False: the chat template gets no tool schemas (the system prompt describes them)
    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, *, max_turns: int = 10, max_tool_calls_per_turn: int = 8, max_tool_output_chars: int = 4000,
                 tool_timeout: float | None = 30.0, reward_fn: RewardFn | str | None = None):
        if max_turns < 1 or max_tool_calls_per_turn < 1 or max_tool_output_chars < 1:
            raise ValueError("max_turns, max_tool_calls_per_turn and max_tool_output_chars must be >= 1")
        self.max_turns = max_turns
        self.max_tool_calls_per_turn = max_tool_calls_per_turn
        self.max_tool_output_chars = max_tool_output_chars
        self.tool_timeout = tool_timeout
        self.reward_fn: RewardFn = self.reward if reward_fn is None else _resolve_reward_fn(reward_fn)
        self.action_space = TextSpace()
        self.observation_space = MessagesSpace()
        self.current_task: Task | None = None
        self.history: list[Message] = []
        self.final_text: str | None = None
        self._ending: str | None = None
        self._turn = 0
        self._done = True
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- what a subclass writes ----
    def task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        """The episode's task, drawn from ``rng`` only (so ``reset(seed)`` is deterministic)."""
        raise NotImplementedError

    def reward(self, task: Task, history: list[Message], final_text: str) -> float:
        """Final reward, given the whole history and the final answer's text (outside any tool-call
        block and after a closing ``</think>``)."""
        raise NotImplementedError

    def turn_reward(self, task: Task, action: str, results: list[ToolResult]) -> float:
        """Per-turn shaping reward (default 0)."""
        return 0.0

    def num_tasks(self) -> int | None:
        """Finite task sets (SWE instances, question sets) return their size; then ``task`` must honour
        ``options["task_index"]`` in ``range(num_tasks())`` (evaluation visits each task once) and
        otherwise draw an index from ``rng``. Procedural envs return None (evaluation uses seeds)."""
        return None

    def episode_metrics(self) -> dict[str, float]:
        """Numbers describing the finished episode for evaluation summaries (averaged over episodes),
        e.g. ``{"em": 1.0, "f1": 1.0, "searches": 2}``. Called once the episode has ended."""
        return {}

    def episode_artifacts(self) -> dict[str, str]:
        """Files worth keeping for the finished episode (file name -> text), written by evaluation
        next to its record, e.g. ``{"patch.diff": ..., "test_log.txt": ...}``."""
        return {}

    def demonstration(self, task: Task) -> list[str]:
        """Optional: the assistant turns of a correct episode (for supervised warm-up and as a
        scripted reference policy, agentrl.sft). Envs that cannot script one leave this unimplemented."""
        raise NotImplementedError(f"{type(self).__name__} has no scripted demonstration")

    def end_episode(self, final_text: str) -> None:
        """For tools that finish the task (``answer``, ``submit``): the episode terminates after the current
        turn, scored as a final answer whose text is ``final_text`` (``reward(task, history, final_text)``);
        tool calls after this one in the same turn are not run and get an error."""
        self._ending = str(final_text)

    # ---- gymnasium API ----
    def tool_schemas(self) -> list[dict[str, Any]]:
        """The tools as OpenAI function specs (the chat template's ``tools=``); fresh copies."""
        return [t.schema() for t in self.tools]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._tool_map = _check_tools(self.tools)
        task = self.task(self.np_random, dict(options or {}))
        if not isinstance(task, Task) or not self.observation_space.contains(task.messages):
            raise TypeError(f"{type(self).__name__}.task() must return a Task whose messages are "
                            "[{'role': ..., 'content': str}, ...]")
        messages = copy.deepcopy(task.messages)
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        self.current_task, self.history, self._turn, self._done = task, copy.deepcopy(messages), 0, False
        self._ending: str | None = None
        self.final_text: str | None = None  # the answer that ended the episode (for metrics)
        tools = self.tool_schemas() if self.tools_in_prompt else []
        return messages, {"tools": tools, "task_id": task.id or _hash_messages(task.messages)}

    def step(self, action: str):
        """Sync ``astep``: runs it on this env's private event loop. Inside a running event loop
        (async code) use ``await env.astep(action)`` instead."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(self.astep(action))
        raise RuntimeError("step() called inside a running event loop; use `await env.astep(action)`")

    async def astep(self, action: str):
        """One assistant turn -> (new messages, reward, terminated, truncated, info). Async tools are
        awaited and sync tools run in threads, so concurrent episodes never block each other."""
        if self.current_task is None or self._done:
            raise RuntimeError("call reset() before step() (the episode is over or never started)")
        if not isinstance(action, str):
            raise TypeError(f"action must be the assistant's text (str), got {type(action).__name__}")
        task = self.current_task
        self._turn += 1
        self.history.append({"role": "assistant", "content": action})
        parsed = parse_tool_calls(action)
        results: list[ToolResult] = []
        ended_by = ""
        for item in parsed.items[: self.max_tool_calls_per_turn]:
            if self._ending is not None:
                results.append(ToolResult(getattr(item, "name", ""), getattr(item, "arguments", None),
                                          f"Error: not run: the episode already ended ({ended_by} was called)", False))
            elif isinstance(item, str):
                results.append(ToolResult("", None, f"Error: {item}", False))
            else:
                results.append(await self._run_call(item))
                if self._ending is not None and results[-1].ok:
                    ended_by = item.name
                else:
                    self._ending = None  # only a call that succeeded ends the episode
        if len(parsed.items) > self.max_tool_calls_per_turn:  # one message for the rest, however many
            results.append(ToolResult("", None, f"Error: {len(parsed.items) - self.max_tool_calls_per_turn} more "
                                      f"tool calls not run (at most {self.max_tool_calls_per_turn} per turn)", False))
        terminated = not parsed.items or self._ending is not None
        final_reward = None
        if terminated:
            final_text = (self._ending if self._ending is not None
                          else parsed.content.rsplit("</think>", 1)[-1].strip())
            self.final_text = final_text
            final_reward = float(self.reward_fn(task, self.history, final_text))
        observation = [{"role": "tool", "name": r.name, "content": self._clip(r.content)} for r in results]
        self.history.extend(copy.deepcopy(observation))
        truncated = not terminated and self._turn >= self.max_turns
        self._done = terminated or truncated
        turn_reward = float(self.turn_reward(task, action, results))
        info = {"turn": self._turn, "turn_reward": turn_reward, "final_reward": final_reward,
                "tool_calls": [{"name": r.name, "arguments": copy.deepcopy(r.arguments), "ok": r.ok} for r in results],
                "tool_errors": sum(not r.ok for r in results)}
        return observation, turn_reward + (final_reward or 0.0), terminated, truncated, info

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.close()
        super().close()

    # ---- internals ----
    async def _run_call(self, call: ToolCall) -> ToolResult:
        t = self._tool_map.get(call.name)
        if t is None:
            return ToolResult(call.name, call.arguments, f"Error: unknown tool {call.name!r}; available: "
                              f"{', '.join(self._tool_map) or 'none'}", False)
        try:
            content = await t.call(call.arguments, timeout=self.tool_timeout)
        except ToolArgumentsError as e:
            return ToolResult(call.name, call.arguments, f"Error: invalid arguments for {call.name}: {e}", False)
        except ToolTimeoutError as e:
            return ToolResult(call.name, call.arguments, f"Error: {e}", False)
        except Exception as e:  # a raising tool is the model's problem to handle, not a crash
            return ToolResult(call.name, call.arguments, f"Error: {type(e).__name__}: {e}", False)
        return ToolResult(call.name, call.arguments, content, True)

    def _clip(self, text: str) -> str:
        extra = len(text) - self.max_tool_output_chars
        return text if extra <= 0 else f"{text[: self.max_tool_output_chars]}…[truncated {extra} chars]"


def _check_tools(tools: list[Tool]) -> dict[str, Tool]:
    out: dict[str, Tool] = {}
    for t in tools:
        if not isinstance(t, Tool):
            raise TypeError(f"tools must be Tool objects (decorate functions with @tool), got {t!r}")
        if t.name in out:
            raise ValueError(f"two tools are named {t.name!r}")
        out[t.name] = t
    return out


def _hash_messages(messages: list[Message]) -> str:
    return hashlib.sha1(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Resolution and registry
# --------------------------------------------------------------------------------------------

def _import_path(path: str, what: str) -> Any:
    """``"module.path:attr"`` -> the object, with an error that says which part is missing."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {path!r} must look like 'module.path:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {path!r}: cannot import module {module_name!r} ({e})") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _resolve_reward_fn(reward_fn: RewardFn | str) -> RewardFn:
    fn = _import_path(reward_fn, "reward_fn") if isinstance(reward_fn, str) else reward_fn
    if not callable(fn):
        raise TypeError(f"reward_fn must be callable (task, history, final_text) -> float, got {fn!r}")
    return fn


_REGISTRY: dict[str, tuple[str | type, dict[str, Any]]] = {}


def register(id: str, entry_point: str | type, **default_kwargs: Any) -> None:
    """Register an env id. ``entry_point`` is a ToolEnv subclass or a lazy ``"module.path:ClassName"``."""
    if id in _REGISTRY and _REGISTRY[id] != (entry_point, default_kwargs):
        warnings.warn(f"re-registering env {id!r}", stacklevel=2)
    _REGISTRY[id] = (entry_point, dict(default_kwargs))


def registered() -> list[str]:
    return sorted(_REGISTRY)


def make(spec: str, **kwargs: Any) -> ToolEnv:
    """Build an env from a registered id (its default kwargs, overridden by ``kwargs``) or from a
    ``"module.path:ClassName"`` spec."""
    if spec in _REGISTRY:
        entry_point, defaults = _REGISTRY[spec]
        kwargs = {**defaults, **kwargs}
    elif ":" in spec:
        entry_point = spec
    else:
        raise ValueError(f"unknown env {spec!r}; registered: {', '.join(registered()) or 'none'} "
                         "(or pass 'module.path:ClassName')")
    cls = _import_path(entry_point, "env") if isinstance(entry_point, str) else entry_point
    if not (isinstance(cls, type) and issubclass(cls, ToolEnv)):
        raise TypeError(f"env {spec!r} resolves to {cls!r}, which is not a ToolEnv subclass")
    return cls(**kwargs)


register("calculator-v0", "envs.calculator:CalculatorEnv")
register("kvstore-v0", "envs.kvstore:KVStoreEnv")
register("arith-v0", "envs.arith:ArithEnv")
register("browse-v0", "envs.browse.env:BrowseEnv")
register("swe-v0", "envs.swe:SWEEnv")
