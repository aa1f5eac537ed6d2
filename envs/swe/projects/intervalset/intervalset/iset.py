"""IntervalSet: a set of numbers kept as sorted, disjoint, non-touching, non-empty intervals."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .interval import Interval


class IntervalSet:
    def __init__(self, intervals: Iterable[tuple[float, float] | Interval] = ()) -> None:
        self._items: list[Interval] = []
        for item in intervals:
            start, end = (item.start, item.end) if isinstance(item, Interval) else item
            self.add(start, end)

    def add(self, start: float, end: float) -> None:
        """Add [start, end); overlapping or touching intervals are merged into one."""
        new = Interval(start, end)
        if new.is_empty():
            return
        keep = []
        for item in self._items:
            if item.end < new.start or item.start > new.end:
                keep.append(item)
            else:
                new = Interval(min(item.start, new.start), max(item.end, new.end))
        keep.append(new)
        self._items = sorted(keep)

    def remove(self, start: float, end: float) -> None:
        """Remove [start, end): intervals are cut, or split in two when it falls inside one."""
        cut = Interval(start, end)
        out = []
        for item in self._items:
            if not item.overlaps(cut):
                out.append(item)
                continue
            if item.start < cut.start:
                out.append(Interval(item.start, cut.start))
            if cut.end < item.end:
                out.append(Interval(cut.end, item.end))
        self._items = out

    def __contains__(self, x: float) -> bool:
        return any(item.contains(x) for item in self._items)

    def __iter__(self) -> Iterator[Interval]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntervalSet) and self._items == other._items

    def __repr__(self) -> str:
        return f"IntervalSet([{', '.join(f'({i.start}, {i.end})' for i in self._items)}])"

    def total_length(self) -> float:
        return sum(item.length for item in self._items)

    def union(self, other: IntervalSet) -> IntervalSet:
        return IntervalSet([*self._items, *other._items])

    def intersection(self, other: IntervalSet) -> IntervalSet:
        out, i, j = [], 0, 0
        a, b = self._items, other._items
        while i < len(a) and j < len(b):
            lo, hi = max(a[i].start, b[j].start), min(a[i].end, b[j].end)
            if lo < hi:
                out.append((lo, hi))
            if a[i].end < b[j].end:
                i += 1
            else:
                j += 1
        return IntervalSet(out)

    def complement(self, lo: float, hi: float) -> IntervalSet:
        """The gaps of this set inside [lo, hi)."""
        out, cursor = [], lo
        for item in self._items:
            if item.end <= lo:
                continue
            if item.start >= hi:
                break
            if item.start > cursor:
                out.append((cursor, item.start))
            cursor = max(cursor, item.end)
        if cursor < hi:
            out.append((cursor, hi))
        return IntervalSet(out)
