"""datefmt: parse calendar dates written by people and do day/month arithmetic on them."""

from .arith import add_days, add_months, days_between
from .calendar import Date, days_in_month, is_leap_year
from .parse import ParseError, parse_date

__all__ = ["Date", "ParseError", "add_days", "add_months", "days_between", "days_in_month", "is_leap_year",
           "parse_date"]
