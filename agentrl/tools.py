"""Tools for agent environments: the ``@tool`` decorator and the parser for model-emitted tool calls.

Owns:
  * ``Tool`` / ``@tool`` -- a typed Python function (sync or ``async def``) as a tool: its JSON schema
    comes from pydantic (``create_model`` over the signature) with the description and per-argument
    descriptions taken from the Google-style docstring; ``validate`` checks model-emitted arguments,
    ``call`` runs the tool without blocking the event loop (sync tools go to a thread) under a timeout
    and returns text.
  * ``parse_tool_calls`` -- finds the Qwen3/Hermes ``<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>`` blocks in an assistant turn. It never raises: every malformed block becomes a short,
    model-readable error string. It runs in linear time (``str.find`` scanning, no regex).

Does not own: running episodes, error observations or limits (agentrl.env), the chat template
(agentrl.model.tokenizer).

A block whose JSON holds the literal text ``</tool_call>`` inside a string ends at that text, as in
every tag-based format; the JSON is then invalid and reported as such.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic

__all__ = ["Tool", "ToolCall", "ParseResult", "ToolArgumentsError", "ToolTimeoutError", "tool", "parse_tool_calls"]

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
_NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_SECTION_RE = re.compile(r"(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Examples?|Notes?|Attributes):\s*")
_ARG_LINE_RE = re.compile(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")


class ToolArgumentsError(ValueError):
    """The arguments a model gave do not fit the tool's signature (message is short and model-readable)."""


class ToolTimeoutError(Exception):
    """The tool ran past its timeout."""


# --------------------------------------------------------------------------------------------
# Docstrings
# --------------------------------------------------------------------------------------------

def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Google-style docstring -> (first paragraph, {argument: description})."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION_RE.fullmatch(line.strip()):
            break
        summary.append(line.strip())
    args: dict[str, str] = {}
    in_args, current, arg_indent = False, None, None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if indent == 0 and _SECTION_RE.fullmatch(stripped):
            in_args = stripped.split(":")[0] in ("Args", "Arguments", "Parameters")
            current, arg_indent = None, None
            continue
        if not in_args or not stripped:
            continue
        if indent == 0:  # dedent ends the section
            in_args = False
            continue
        m = _ARG_LINE_RE.fullmatch(stripped)
        if m and (arg_indent is None or indent <= arg_indent):
            arg_indent = indent
            current = m.group(1)
            args[current] = m.group(2).strip()
        elif current is not None:  # continuation line
            args[current] = (args[current] + " " + stripped).strip()
    return " ".join(summary), args


def _strip_titles(schema: Any) -> Any:
    """Drop pydantic's auto-generated ``title`` keys (prompt tokens, no information)."""
    if isinstance(schema, dict):
        out = {}
        for k, v in schema.items():
            if k == "title" and isinstance(v, str):
                continue
            if k in ("default", "enum", "const", "examples"):  # values, not schemas
                out[k] = v
            elif k in ("properties", "$defs") and isinstance(v, dict):
                out[k] = {name: _strip_titles(sub) for name, sub in v.items()}
            else:
                out[k] = _strip_titles(v)
        return out
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump_json()
    if value is None or isinstance(value, (dict, list, tuple, bool, int, float)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _format_validation_error(err: pydantic.ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(x) for x in e["loc"]) or "arguments"
        msg = e["msg"]
        if e["type"] not in ("missing", "extra_forbidden"):
            got = repr(e.get("input"))
            msg += f" (got {got[:40] + '...' if len(got) > 40 else got})"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Tool
# --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Tool:
    """A typed function the model can call. Build it with ``@tool``; call the function itself with
    ``tool_obj(...)`` (plain Python call) or run a model's call with ``await tool_obj.call(arguments)``.

    Fields: ``name``; ``description`` (docstring's first paragraph); ``parameters`` (JSON schema of the
    arguments object, from pydantic); ``fn`` (the function); ``timeout`` (seconds, None = the caller's
    default); ``is_async``.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    timeout: float | None = None
    is_async: bool = False
    _model: type[pydantic.BaseModel] = field(default=None, repr=False)  # type: ignore[assignment]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def schema(self) -> dict[str, Any]:
        """OpenAI function spec, the form the chat template's ``tools=`` takes."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": copy.deepcopy(self.parameters)}}

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Validated keyword arguments for ``fn``. Raises ``ToolArgumentsError`` (wrong types, missing or
        extra keys) with a short message naming each bad argument."""
        if not isinstance(arguments, dict):
            raise ToolArgumentsError(f"arguments must be a JSON object, got {type(arguments).__name__}")
        try:
            model = self._model.model_validate(arguments)
        except pydantic.ValidationError as e:
            raise ToolArgumentsError(_format_validation_error(e)) from None
        return {name: getattr(model, name) for name in type(model).model_fields}

    async def call(self, arguments: Any, *, timeout: float | None = None) -> str:
        """Validate ``arguments``, run the tool and return its result as text (dicts/lists as JSON).

        A sync tool runs in a worker thread (``asyncio.to_thread``) so it never blocks the event loop.
        ``self.timeout`` (or else ``timeout``) bounds the run: past it ``ToolTimeoutError`` is raised
        (an async tool is cancelled; a sync tool's thread cannot be stopped and finishes in the
        background). Exceptions from the tool propagate unchanged.
        """
        kwargs = self.validate(arguments)
        limit = self.timeout if self.timeout is not None else timeout
        try:
            async with asyncio.timeout(limit) as scope:
                if self.is_async:
                    result = await self.fn(**kwargs)
                else:
                    result = await asyncio.to_thread(self.fn, **kwargs)
        except TimeoutError:
            if scope.expired():
                raise ToolTimeoutError(f"{self.name} timed out after {limit:g} s") from None
            raise
        return _to_text(result)


def _make_tool(fn: Callable[..., Any], name: str | None, timeout: float | None) -> Tool:
    name = name or fn.__name__
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"tool name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
    description, arg_docs = _parse_docstring(fn.__doc__)
    hints = typing.get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    for pname, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"tool {name}: parameter {pname!r} must be a plain or keyword argument")
        if pname not in hints:
            raise TypeError(f"tool {name}: parameter {pname!r} needs a type hint")
        default = ... if p.default is p.empty else p.default
        fields[pname] = (hints[pname], pydantic.Field(default, description=arg_docs.get(pname)))
    model = pydantic.create_model(f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"), **fields)
    parameters = _strip_titles(model.model_json_schema())
    parameters.setdefault("properties", {})
    return Tool(name=name, description=description, parameters=parameters, fn=fn, timeout=timeout,
                is_async=inspect.iscoroutinefunction(fn), _model=model)


@typing.overload
def tool(fn: Callable[..., Any], /) -> Tool: ...
@typing.overload
def tool(*, name: str | None = None, timeout: float | None = None) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(fn=None, /, *, name=None, timeout=None):
    """Make a ``Tool`` from a typed function: ``@tool`` or ``@tool(name="x", timeout=5.0)``.

    Every parameter needs a type hint (pydantic types: int, float, str, list[int], Literal, Optional,
    BaseModel, Annotated[..., Field(...)]). Also works on bound methods: ``tool(self.lookup)``.
    """
    if fn is not None:
        return _make_tool(fn, name, timeout)
    return lambda f: _make_tool(f, name, timeout)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

@dataclass
class ToolCall:
    """One well-formed call: ``raw`` is the whole ``<tool_call>...</tool_call>`` block as emitted."""

    name: str
    arguments: dict[str, Any]
    raw: str


@dataclass
class ParseResult:
    """``calls`` (well formed), ``errors`` (one short message per malformed block or stray tag),
    ``content`` (the text outside the blocks), and ``items``: calls and errors in text order."""

    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    content: str = ""
    items: list[ToolCall | str] = field(default_factory=list)

    def _add(self, item: ToolCall | str) -> None:
        (self.calls if isinstance(item, ToolCall) else self.errors).append(item)
        self.items.append(item)


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _parse_block(body: str, raw: str) -> ToolCall | str:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return f"invalid JSON in <tool_call> ({e.msg} at char {e.pos})"
    except (ValueError, RecursionError) as e:  # e.g. int too long, nesting too deep
        return f"invalid JSON in <tool_call> ({type(e).__name__})"
    if not isinstance(obj, dict):
        return f'<tool_call> must hold a JSON object {{"name": ..., "arguments": {{...}}}}, got {_type_name(obj)}'
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return '<tool_call> is missing "name" (a non-empty string)' if name is None or name == "" else \
            f'"name" must be a string, got {_type_name(name)}'
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models JSON-encode the arguments object
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return f'{name}: "arguments" is a string that is not valid JSON'
    if not isinstance(args, dict):
        return f'{name}: "arguments" must be a JSON object, got {_type_name(args)}'
    return ToolCall(name=name, arguments=args, raw=raw)


def parse_tool_calls(text: str) -> ParseResult:
    """Parse every ``<tool_call>...</tool_call>`` block of an assistant turn. Never raises.

    Errors: an unclosed block (runs to the end of text), a block opened again before it closed, a stray
    ``</tool_call>``, invalid JSON, a non-object body, a missing/non-string ``name``, ``arguments`` not an
    object (a JSON string holding an object is accepted; missing ``arguments`` means ``{}``).
    Linear time: each ``find`` result is reused until the scan passes it.
    """
    result = ParseResult()
    if not isinstance(text, str):
        result._add(f"expected text, got {type(text).__name__}")
        return result
    content: list[str] = []
    pos, n = 0, len(text)
    next_open = text.find(OPEN_TAG)
    next_close = text.find(CLOSE_TAG)
    while pos < n:
        if next_open != -1 and next_open < pos:
            next_open = text.find(OPEN_TAG, pos)
        if next_close != -1 and next_close < pos:
            next_close = text.find(CLOSE_TAG, pos)
        if next_close != -1 and (next_open == -1 or next_close < next_open):  # stray close tag
            content.append(text[pos:next_close])
            result._add("</tool_call> without a matching <tool_call>")
            pos = next_close + len(CLOSE_TAG)
            continue
        if next_open == -1:
            content.append(text[pos:])
            break
        content.append(text[pos:next_open])
        body_start = next_open + len(OPEN_TAG)
        following_open = text.find(OPEN_TAG, body_start)
        if next_close == -1 or (following_open != -1 and following_open < next_close):
            end = n if following_open == -1 else following_open
            what = "unclosed <tool_call> (missing </tool_call>)" if following_open == -1 else \
                "<tool_call> opened again before </tool_call>"
            result._add(what)
            pos, next_open = end, following_open
            continue
        raw = text[next_open: next_close + len(CLOSE_TAG)]
        result._add(_parse_block(text[body_start:next_close], raw))
        pos, next_open = next_close + len(CLOSE_TAG), following_open
    result.content = "".join(content)
    return result
