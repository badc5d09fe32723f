"""``RangeSet``: a set of integers kept as sorted disjoint ``[start, stop)`` ranges.

Progress is recorded as ranges of sample sequence numbers, never one row per sample: an
epoch acknowledged in order is a single range whatever its size.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

import numpy as np

__all__ = ["RangeSet", "as_array", "runs"]


def runs(values: np.ndarray, limit: int | None = None) -> list[tuple[int, int]] | None:
    """The ``[start, stop)`` runs of consecutive integers in ``values`` (kept in their order).

    None when there are more than ``limit`` runs (counted before any is built).
    """
    if len(values) == 0:
        return []
    values = np.asarray(values, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(values) != 1) + 1
    if limit is not None and len(breaks) >= limit:
        return None
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(values)]))
    return [
        (int(values[a]), int(values[b - 1]) + 1)
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True)
    ]


def as_array(ranges: list[tuple[int, int]]) -> np.ndarray:
    """Every integer of the ranges, in order, as one int64 array (no Python per value)."""
    if len(ranges) == 1:
        return np.arange(ranges[0][0], ranges[0][1], dtype=np.int64)
    bounds = np.array(ranges, dtype=np.int64).reshape(-1, 2)
    lengths = bounds[:, 1] - bounds[:, 0]
    ends = np.cumsum(lengths)
    steps = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    return steps + np.repeat(bounds[:, 0] - (ends - lengths), lengths)


class RangeSet:
    """A set of non-negative integers stored as sorted, disjoint, non-touching ranges."""

    __slots__ = ("_starts", "_stops")

    def __init__(self, ranges: Iterable[tuple[int, int] | list[int]] = ()) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        for start, stop in ranges:
            self.add(start, stop)

    def __repr__(self) -> str:
        return f"RangeSet({self.ranges()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self.ranges() == other.ranges()

    def __len__(self) -> int:
        return sum(b - a for a, b in zip(self._starts, self._stops, strict=True))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._stops, strict=True))

    def __contains__(self, value: int) -> bool:
        i = bisect.bisect_right(self._starts, value) - 1
        return i >= 0 and value < self._stops[i]

    def ranges(self) -> list[tuple[int, int]]:
        """The ranges, in order."""
        return list(zip(self._starts, self._stops, strict=True))

    def copy(self) -> RangeSet:
        """An independent copy."""
        other = RangeSet()
        other._starts = list(self._starts)
        other._stops = list(self._stops)
        return other

    def add(self, start: int, stop: int) -> None:
        """Add ``[start, stop)``, merging with neighbours it touches."""
        if stop <= start:
            return
        stops = self._stops
        if not stops or start > stops[-1]:  # past the end (a loop's next batch): append
            self._starts.append(start)
            stops.append(stop)
            return
        if start == stops[-1]:  # touching the last range: it grows
            stops[-1] = stop
            return
        lo = bisect.bisect_left(self._stops, start)  # first range ending at/after start
        hi = bisect.bisect_right(self._starts, stop)  # ranges starting at/before stop
        if lo < hi:
            start = min(start, self._starts[lo])
            stop = max(stop, self._stops[hi - 1])
        self._starts[lo:hi] = [start]
        self._stops[lo:hi] = [stop]

    def update(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Add every range."""
        for start, stop in ranges:
            self.add(start, stop)

    def remove(self, start: int, stop: int) -> None:
        """Remove ``[start, stop)``."""
        if stop <= start:
            return
        lo = bisect.bisect_right(self._stops, start)  # first range ending after start
        hi = bisect.bisect_left(self._starts, stop)  # ranges starting before stop
        if lo >= hi:
            return
        keep_starts: list[int] = []
        keep_stops: list[int] = []
        if self._starts[lo] < start:
            keep_starts.append(self._starts[lo])
            keep_stops.append(start)
        if self._stops[hi - 1] > stop:
            keep_starts.append(stop)
            keep_stops.append(self._stops[hi - 1])
        self._starts[lo:hi] = keep_starts
        self._stops[lo:hi] = keep_stops

    def intersection(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The parts of ``[start, stop)`` that are in the set."""
        found = []
        i = max(bisect.bisect_right(self._stops, start), 0)
        while i < len(self._starts) and self._starts[i] < stop:
            found.append((max(start, self._starts[i]), min(stop, self._stops[i])))
            i += 1
        return found

    def gaps(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The parts of ``[start, stop)`` that are not in the set."""
        found = []
        cursor = start
        for a, b in self.intersection(start, stop):
            if a > cursor:
                found.append((cursor, a))
            cursor = b
        if cursor < stop:
            found.append((cursor, stop))
        return found

    def first_gap_start(self, start: int, stop: int) -> int | None:
        """The smallest value in ``[start, stop)`` not in the set, or None."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0 and start < self._stops[i]:
            start = self._stops[i]
        return start if start < stop else None

    def pop_first(self, limit: int) -> list[tuple[int, int]]:
        """Remove and return up to ``limit`` values from the front, as ranges."""
        taken: list[tuple[int, int]] = []
        while self._starts and limit > 0:
            start, stop = self._starts[0], self._stops[0]
            end = min(stop, start + limit)
            taken.append((start, end))
            limit -= end - start
            self.remove(start, end)
        return taken
