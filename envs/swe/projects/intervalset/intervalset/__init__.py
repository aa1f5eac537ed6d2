"""intervalset: sets of half-open intervals [start, end) with union, removal, intersection, gaps."""

from .interval import Interval
from .iset import IntervalSet

__all__ = ["Interval", "IntervalSet"]
