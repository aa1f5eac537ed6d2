"""The parsed template: a tree of Text, Var, If and For nodes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Text:
    text: str


@dataclass
class Var:
    expr: str
    filters: list[str]


@dataclass
class If:
    expr: str
    negate: bool
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)


@dataclass
class For:
    var: str
    expr: str
    body: list = field(default_factory=list)
