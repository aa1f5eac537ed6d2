"""Parsing a template source into nodes, and rendering nodes with a context."""

from __future__ import annotations

import re
from typing import Any

from .escape import Safe, escape
from .nodes import For, If, Text, Var

TOKEN = re.compile(r"({{.*?}}|{%.*?%})", re.S)
FILTERS = {
    "upper": lambda v: str(v).upper(),
    "lower": lambda v: str(v).lower(),
    "title": lambda v: str(v).title(),
    "strip": lambda v: str(v).strip(),
    "length": len,
    "safe": lambda v: Safe(str(v)),
}


class TemplateSyntaxError(ValueError):
    """The template source is malformed."""


def _parse(source: str) -> list:
    root: list = []
    stack: list[tuple[object, list]] = [(None, root)]
    for token in TOKEN.split(source):
        if not token:
            continue
        if token.startswith("{{"):
            expr, *filters = [part.strip() for part in token[2:-2].split("|")]
            for name in filters:
                if name not in FILTERS:
                    raise TemplateSyntaxError(f"unknown filter {name!r}")
            stack[-1][1].append(Var(expr, filters))
        elif token.startswith("{%"):
            words = token[2:-2].split()
            tag = words[0] if words else ""
            if tag == "if":
                negate = len(words) == 3 and words[1] == "not"
                node = If(words[-1], negate)
                stack[-1][1].append(node)
                stack.append((node, node.body))
            elif tag == "else":
                if not isinstance(stack[-1][0], If):
                    raise TemplateSyntaxError("{% else %} outside {% if %}")
                stack[-1] = (stack[-1][0], stack[-1][0].orelse)
            elif tag == "for" and len(words) == 4 and words[2] == "in":
                node = For(words[1], words[3])
                stack[-1][1].append(node)
                stack.append((node, node.body))
            elif tag in ("endif", "endfor"):
                expected = If if tag == "endif" else For
                if not isinstance(stack[-1][0], expected):
                    raise TemplateSyntaxError(f"unexpected {{% {tag} %}}")
                stack.pop()
            else:
                raise TemplateSyntaxError(f"unknown tag {token!r}")
        else:
            stack[-1][1].append(Text(token))
    if len(stack) > 1:
        raise TemplateSyntaxError(f"unclosed {{% {type(stack[-1][0]).__name__.lower()} %}}")
    return root


def lookup(expr: str, context: dict[str, Any]) -> Any:
    """A dotted name: dict keys, list indexes and attributes; None when any part is missing."""
    name, *rest = expr.split(".")
    value = context.get(name)
    for part in rest:
        if value is None:
            return None
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, (list, tuple)) and part.isdigit():
            index = int(part)
            value = value[index] if index < len(value) else None
        else:
            value = getattr(value, part, None)
    return value


def _render(nodes: list, context: dict[str, Any], out: list[str], autoescape: bool) -> None:
    for node in nodes:
        if isinstance(node, Text):
            out.append(node.text)
        elif isinstance(node, Var):
            value = lookup(node.expr, context)
            for name in node.filters:
                value = FILTERS[name](value)
            text = "" if value is None else value
            out.append(escape(text) if autoescape else str(text))
        elif isinstance(node, If):
            truthy = bool(lookup(node.expr, context)) != node.negate
            _render(node.body if truthy else node.orelse, context, out, autoescape)
        elif isinstance(node, For):
            items = list(lookup(node.expr, context) or [])
            for i, item in enumerate(items):
                inner = dict(context)
                inner[node.var] = item
                inner["loop"] = {"index": i + 1, "first": i == 0, "last": i == len(items) - 1}
                _render(node.body, inner, out, autoescape)


class Template:
    def __init__(self, source: str, autoescape: bool = True) -> None:
        self.nodes = _parse(source)
        self.autoescape = autoescape

    def render(self, context: dict[str, Any] | None = None, **kwargs: Any) -> str:
        out: list[str] = []
        _render(self.nodes, {**(context or {}), **kwargs}, out, self.autoescape)
        return "".join(out)


def render(source: str, context: dict[str, Any] | None = None, **kwargs: Any) -> str:
    return Template(source).render(context, **kwargs)
