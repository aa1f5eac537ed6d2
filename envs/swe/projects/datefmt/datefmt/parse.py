"""Parse dates written as ISO (2024-03-01), day-first or month-first numbers (01/03/2024, 1/3/24)
or with a month name (March 1, 2024 / 1 March 2024 / Mar 1st 2024)."""

from __future__ import annotations

import re

from .calendar import Date

MONTH_NAMES = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
               "October", "November", "December"]
MONTHS = {name: i for i, name in enumerate(MONTH_NAMES, 1)} | {name[:3]: i for i, name in enumerate(MONTH_NAMES, 1)}

_ISO = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})")
_NUMERIC = re.compile(r"(\d{1,2})[/.](\d{1,2})[/.](\d{4}|\d{2})")
_MONTH_FIRST = re.compile(r"([A-Za-z]+)\.?\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})")
_DAY_FIRST = re.compile(r"(\d{1,2})(?:st|nd|rd|th)?\s+([A-Za-z]+)\.?,?\s+(\d{4})")


class ParseError(ValueError):
    """The text is not a date in any supported format, or names a day that does not exist."""


def expand_year(yy: int, pivot: int = 50) -> int:
    """Two-digit years below ``pivot`` are in the 2000s, the others in the 1900s."""
    return 2000 + yy if yy < pivot else 1900 + yy


def _month(name: str, text: str) -> int:
    month = MONTHS.get(name.title())
    if month is None:
        raise ParseError(f"{text!r}: unknown month name {name!r}")
    return month


def parse_date(text: str, *, day_first: bool = True, pivot: int = 50) -> Date:
    """Parse ``text``; numeric dates are day/month/year unless ``day_first`` is False."""
    s = text.strip()
    if m := _ISO.fullmatch(s):
        year, month, day = (int(g) for g in m.groups())
    elif m := _NUMERIC.fullmatch(s):
        a, b, y = m.groups()
        day, month = (int(a), int(b)) if day_first else (int(b), int(a))
        year = expand_year(int(y), pivot) if len(y) == 2 else int(y)
    elif m := _MONTH_FIRST.fullmatch(s):
        month, day, year = _month(m.group(1), text), int(m.group(2)), int(m.group(3))
    elif m := _DAY_FIRST.fullmatch(s):
        day, month, year = int(m.group(1)), _month(m.group(2), text), int(m.group(3))
    else:
        raise ParseError(f"{text!r} is not a date in a supported format")
    try:
        return Date(year, month, day)
    except ValueError as e:
        raise ParseError(f"{text!r}: {e}") from None
