"""Date arithmetic: whole days and calendar months."""

from __future__ import annotations

from .calendar import Date, days_in_month


def add_days(date: Date, days: int) -> Date:
    return Date.from_ordinal(date.ordinal() + days)


def days_between(start: Date, end: Date) -> int:
    """Days from ``start`` to ``end`` (negative when ``end`` is earlier)."""
    return end.ordinal() - start.ordinal()


def add_months(date: Date, months: int) -> Date:
    """The same day ``months`` later (or earlier), clamped to the last day of a shorter month:
    January 31st plus one month is February 28th (29th in leap years)."""
    total = date.year * 12 + (date.month - 1) + months
    year, month = divmod(total, 12)
    month += 1
    return Date(year, month, min(date.day, days_in_month(year, month)))
