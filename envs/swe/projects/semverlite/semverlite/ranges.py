"""npm-style ranges: space-separated comparators that must all hold (``>=1.2.0 <2.0.0``), ``||``
between alternatives, ``^1.2.3``, ``~1.2.3``, ``1.2.x`` / ``1.2.*`` / ``1.2`` and exact versions."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable

from .version import InvalidVersion, Version

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "=": operator.eq}
_COMPARATOR = re.compile(r"(>=|<=|>|<|=|\^|~)?\s*(.+)")


def _partial(text: str) -> tuple[int, int | None, int | None]:
    parts = text.lstrip("v").split(".")
    nums: list[int | None] = []
    for p in parts[:3]:
        if p in ("x", "X", "*"):
            break
        if not p.isdigit():
            raise InvalidVersion(f"bad version in range: {text!r}")
        nums.append(int(p))
    nums += [None] * (3 - len(nums))
    if nums[0] is None:
        raise InvalidVersion(f"bad version in range: {text!r}")
    return nums[0], nums[1], nums[2]


def _bounds(op: str | None, text: str) -> list[tuple[str, Version]]:
    """One comparator as (operator, version) bounds."""
    if op in _OPS:
        return [(op, Version.parse(text))]
    major, minor, patch = _partial(text)
    low = Version(major, minor or 0, patch or 0)
    if op == "^":
        if major > 0 or minor is None:
            high = Version(major + 1, 0, 0)
        elif minor > 0 or patch is None:
            high = Version(0, minor + 1, 0)
        else:
            high = Version(0, 0, patch + 1)
    elif op == "~" or patch is None:
        high = Version(major + 1, 0, 0) if minor is None else Version(major, minor + 1, 0)
    else:
        return [("=", low)]
    return [(">=", low), ("<", high)]


def satisfies(version: Version | str, spec: str) -> bool:
    if isinstance(version, str):
        version = Version.parse(version)
    for alternative in spec.split("||"):
        bounds = []
        for comparator in alternative.replace(">= ", ">=").replace("<= ", "<=").split():
            op, text = _COMPARATOR.fullmatch(comparator).groups()
            bounds += _bounds(op, text)
        if all(_OPS[op](version, bound) for op, bound in bounds):
            return True
    return False


def max_satisfying(versions: Iterable[Version | str], spec: str) -> Version | None:
    matching = [Version.parse(v) if isinstance(v, str) else v for v in versions]
    matching = [v for v in matching if satisfies(v, spec)]
    return max(matching, default=None)
