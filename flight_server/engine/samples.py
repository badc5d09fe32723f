"""``SampleSet``: sample numbers as one sorted array, for the holes filters leave.

A filter that keeps every other sample leaves as many one-sample holes as it keeps
samples: a ``RangeSet`` (a Python list of ranges, changed one range at a time) then spends
its time moving list items. Dropped samples are only ever added in bulk, counted inside
ranges and forgotten in bulk, which one sorted ``int64`` array does with a few numpy calls
whatever their number.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ...protocol.ranges import as_array, runs

__all__ = ["SampleSet"]

Ranges = Sequence[tuple[int, int]] | Sequence[Sequence[int]]

_EMPTY = np.zeros(0, dtype=np.int64)


def _bounds(ranges: Ranges) -> tuple[np.ndarray, np.ndarray]:
    if not len(ranges):
        return _EMPTY, _EMPTY
    array = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    order = np.argsort(array[:, 0], kind="stable")
    return array[order, 0], array[order, 1]


class SampleSet:
    """A set of sample numbers, kept as one sorted array without duplicates.

    Numbers added after all the others (a stream's next message) wait in a list and join
    the array when it is next read: a stream adds to its rank's set at every message and
    reads it at every report, and joining them one message at a time copied the whole set
    each time (7 % of a filtered stream's thread).
    """

    __slots__ = ("_appended", "_array")

    def __init__(self, values: np.ndarray | Iterable[int] | None = None) -> None:
        self._array: np.ndarray = _EMPTY
        self._appended: list[np.ndarray] = []
        if values is None:
            self._values = _EMPTY
        elif isinstance(values, np.ndarray):
            self._values = np.unique(values.astype(np.int64))
        else:
            self._values = np.unique(np.fromiter(values, dtype=np.int64))

    @property
    def _values(self) -> np.ndarray:
        """The numbers, ascending (the appended ones joined in first)."""
        if self._appended:
            self._array = np.concatenate((self._array, *self._appended))
            self._appended = []
        return self._array

    @_values.setter
    def _values(self, values: np.ndarray) -> None:
        self._array = values
        self._appended = []

    def _last(self) -> int | None:
        """The largest number (None: empty), without joining what was appended."""
        if self._appended:
            return int(self._appended[-1][-1])
        return int(self._array[-1]) if len(self._array) else None

    @classmethod
    def of_ranges(cls, ranges: Ranges) -> SampleSet:
        """Every number of ``[start, stop)`` ranges."""
        found = cls()
        if len(ranges):
            found._values = np.unique(as_array([(int(a), int(b)) for a, b in ranges]))
        return found

    @classmethod
    def _sorted(cls, values: np.ndarray) -> SampleSet:
        found = cls()
        found._values = values
        return found

    def __len__(self) -> int:
        return len(self._array) + sum(len(part) for part in self._appended)

    def __bool__(self) -> bool:
        return bool(len(self))

    def __contains__(self, value: int) -> bool:
        i = int(np.searchsorted(self._values, value))
        return i < len(self._values) and int(self._values[i]) == value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SampleSet) and np.array_equal(self._values, other._values)

    def __repr__(self) -> str:
        return f"SampleSet({self.ranges()!r})"

    @property
    def values(self) -> np.ndarray:
        """The numbers, ascending (read-only view)."""
        view = self._values.view()
        view.flags.writeable = False
        return view

    def ranges(self) -> list[tuple[int, int]]:
        """The numbers as ``[start, stop)`` runs."""
        found = runs(self._values)
        assert found is not None
        return found

    def add(self, other: SampleSet | np.ndarray) -> None:
        """Add every number of ``other``."""
        values = other._values if isinstance(other, SampleSet) else np.asarray(other, np.int64)
        if not len(values):
            return
        if not isinstance(other, SampleSet) and len(values) > 1:
            # batchers hand in sorted arrays: checking is O(n), sorting again O(n log n)
            if not bool((values[1:] > values[:-1]).all()):
                values = np.unique(values)
        last = self._last()
        if last is None:
            self._values = values
        elif values[0] > last:  # the usual case: after all the others (joined when read)
            self._appended.append(values)
        else:
            self._values = np.union1d(self._values, values)

    def add_ranges(self, ranges: Ranges) -> None:
        """Add every number of ``[start, stop)`` ranges."""
        self.add(SampleSet.of_ranges(ranges))

    def _inside(self, ranges: Ranges) -> np.ndarray:
        """Which numbers lie inside the ranges (a mask)."""
        if not len(self._values) or not len(ranges):
            return np.zeros(len(self._values), dtype=bool)
        starts, stops = _bounds(ranges)
        at = np.searchsorted(starts, self._values, side="right") - 1
        inside = at >= 0
        inside[inside] = self._values[inside] < stops[at[inside]]
        # ranges may overlap: a number past its nearest start's stop may lie in an earlier
        # range that reaches further
        if len(starts) > 1 and not np.all(stops[:-1] <= starts[1:]):
            reach = np.maximum.accumulate(stops)
            inside |= (at >= 0) & (self._values < reach[np.maximum(at, 0)])
        return inside

    def _slices(self, ranges: Ranges) -> tuple[int, int] | None:
        """Where the numbers inside the ranges lie, when they are one run of positions.

        ``(start, stop)`` positions in the sorted array, found by binary search of the
        ranges' bounds (no pass over the numbers): the usual case, a batch's span taking
        the dropped samples at the front. None when they lie in several runs (or the
        ranges overlap): then the mask of ``_inside`` says.
        """
        if not len(self._values) or not len(ranges):
            return 0, 0
        starts, stops = _bounds(ranges)
        if len(starts) > 1 and not np.all(stops[:-1] <= starts[1:]):
            return None
        low = np.searchsorted(self._values, starts, side="left")
        high = np.searchsorted(self._values, stops, side="left")
        taken = high > low
        if not taken.any():
            return 0, 0
        low, high = low[taken], high[taken]
        if len(low) > 1 and not np.array_equal(high[:-1], low[1:]):
            return None
        return int(low[0]), int(high[-1])

    def within(self, ranges: Ranges) -> SampleSet:
        """The numbers inside ``[start, stop)`` ranges."""
        found = self._slices(ranges)
        if found is not None:
            return SampleSet._sorted(self._values[found[0] : found[1]])
        return SampleSet._sorted(self._values[self._inside(ranges)])

    def pop_within(self, ranges: Ranges) -> SampleSet:
        """Remove and return the numbers inside ``[start, stop)`` ranges."""
        found = self._slices(ranges)
        if found is not None:
            start, stop = found
            taken = SampleSet._sorted(self._values[start:stop])
            if stop > start:  # at the front (the usual case) a view of the rest: no copy
                rest = self._values[stop:]
                self._values = rest if not start else np.concatenate((self._values[:start], rest))
            return taken
        inside = self._inside(ranges)
        taken = SampleSet._sorted(self._values[inside])
        if len(taken):
            self._values = self._values[~inside]
        return taken

    def discard(self, other: SampleSet) -> None:
        """Remove every number of ``other``.

        The usual case, numbers counted in the catalog at an ack, is a run of this set's
        positions (often at the front): found by two binary searches and one comparison,
        not by ``isin`` (which sorts both).
        """
        if not len(other) or not len(self._values):
            return
        values, gone = self._values, other._values
        start = int(np.searchsorted(values, gone[0]))
        stop = start + len(gone)
        if stop <= len(values) and np.array_equal(values[start:stop], gone):
            rest = values[stop:]
            self._values = rest if not start else np.concatenate((values[:start], rest))
            return
        self._values = values[~np.isin(values, gone, assume_unique=True)]
