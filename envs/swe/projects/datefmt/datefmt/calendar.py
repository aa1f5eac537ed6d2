"""The proleptic Gregorian calendar: leap years, month lengths and a validated Date."""

from __future__ import annotations

from dataclasses import dataclass

MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def is_leap_year(year: int) -> bool:
    """Every fourth year is a leap year, except centuries, except every fourth century."""
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def days_in_month(year: int, month: int) -> int:
    if not 1 <= month <= 12:
        raise ValueError(f"month must be in 1..12, got {month}")
    if month == 2 and is_leap_year(year):
        return 29
    return MONTH_DAYS[month - 1]


@dataclass(frozen=True, order=True)
class Date:
    year: int
    month: int
    day: int

    def __post_init__(self) -> None:
        if self.year < 1:
            raise ValueError(f"year must be >= 1, got {self.year}")
        if not 1 <= self.day <= days_in_month(self.year, self.month):
            raise ValueError(f"day {self.day} is out of range for {self.year:04d}-{self.month:02d}")

    def day_of_year(self) -> int:
        return sum(days_in_month(self.year, m) for m in range(1, self.month)) + self.day

    def ordinal(self) -> int:
        """Days since 0001-01-01, which is day 1."""
        y = self.year - 1
        return y * 365 + y // 4 - y // 100 + y // 400 + self.day_of_year()

    @classmethod
    def from_ordinal(cls, n: int) -> Date:
        if n < 1:
            raise ValueError(f"ordinal must be >= 1, got {n}")
        year = max(1, (n - 1) * 400 // 146097 + 1)
        while year > 1 and cls(year, 1, 1).ordinal() > n:
            year -= 1
        while cls(year + 1, 1, 1).ordinal() <= n:
            year += 1
        rest = n - cls(year, 1, 1).ordinal()  # days after January 1st
        month = 1
        while rest >= days_in_month(year, month):
            rest -= days_in_month(year, month)
            month += 1
        return cls(year, month, rest + 1)

    def weekday(self) -> int:
        """Monday is 0 and Sunday is 6."""
        return (self.ordinal() - 1) % 7

    def isoformat(self) -> str:
        return f"{self.year:04d}-{self.month:02d}-{self.day:02d}"

    def __str__(self) -> str:
        return self.isoformat()
