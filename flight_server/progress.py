"""``RankState``: what one rank of an iteration has been handed, and what it acknowledged.

All numbers here are the rank's *local sequence numbers* (see ``plan``). A sample is in
exactly one of: not yet handed out, pending (pushed back, to hand out again first), in
flight (held by a stream, not acknowledged), acknowledged, filtered, failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..catalog import RankProgressRecord
from .ranges import RangeSet
from .world import World

__all__ = ["RankState", "StreamKey"]

StreamKey = tuple[int, int]
"""A stream of a rank: ``(worker, num_workers)``."""


@dataclass
class RankState:
    """Progress of one rank; every method is called under the iteration's lock."""

    rank: int
    size: int
    batch_size: int
    acked: RangeSet = field(default_factory=RangeSet)
    filtered: RangeSet = field(default_factory=RangeSet)
    failed: RangeSet = field(default_factory=RangeSet)
    pending: RangeSet = field(default_factory=RangeSet)
    inflight: dict[StreamKey, RangeSet] = field(default_factory=dict)
    generation: dict[StreamKey, int] = field(default_factory=dict)
    covered: RangeSet = field(default_factory=RangeSet)

    @classmethod
    def restore(
        cls, record: RankProgressRecord | None, rank: int, size: int, batch_size: int
    ) -> RankState:
        """The state saved in the catalog; what was in flight then is handed out again."""
        state = cls(rank=rank, size=size, batch_size=batch_size)
        if record is not None:
            state.acked.update(record.acked)
            state.filtered.update(record.filtered)
            state.failed.update(record.failed)
            for part in (state.acked, state.filtered, state.failed):
                state.covered.update(part.ranges())
        return state

    def record(self, iteration_id: str) -> RankProgressRecord:
        """What to save in the catalog."""
        inflight = RangeSet()
        for held in self.inflight.values():
            inflight.update(held.ranges())
        return RankProgressRecord(
            iteration_id=iteration_id,
            rank=self.rank,
            acked=self.acked.ranges(),
            filtered=self.filtered.ranges(),
            failed=self.failed.ranges(),
            inflight=inflight.ranges(),
        )

    # -- streams -------------------------------------------------------------------------

    def open_stream(self, key: StreamKey) -> int:
        """Start a stream and return its generation.

        An earlier stream of the same worker (or of another worker count) is over, so what
        it held goes back to the queue.
        """
        for other in list(self.inflight):
            if other == key or other[1] != key[1]:
                self._requeue(other)
        self.generation[key] = self.generation.get(key, 0) + 1
        return self.generation[key]

    def is_current(self, key: StreamKey, generation: int) -> bool:
        """Whether a stream has not been superseded by a newer one of the same worker."""
        return self.generation.get(key) == generation

    def _requeue(self, key: StreamKey) -> int:
        held = self.inflight.pop(key, None)
        if not held:
            return 0
        self.pending.update(held.ranges())
        return len(held)

    def pushback(self) -> int:
        """Return every in-flight sample to the queue; how many."""
        return sum(self._requeue(key) for key in list(self.inflight))

    def next_work(
        self, world: World, key: StreamKey, cursor: int
    ) -> tuple[list[tuple[int, int]], int]:
        """The next samples for a stream, at most one chunk, marked in flight; and the new cursor.

        Pushed-back samples of chunks this worker owns come first; then the first chunk at or
        after ``cursor`` with samples nobody has.
        """
        size, batch = self.size, self.batch_size
        for start, stop in self.pending.ranges():
            chunk = start // batch
            while start < stop:
                end = min(stop, (chunk + 1) * batch)
                if world.owns(chunk):
                    self.pending.remove(start, end)
                    self._hold(key, [(start, end)])
                    return [(start, end)], cursor
                chunk += 1
                start = chunk * batch
        while cursor < size:
            first = self.covered.first_gap_start(cursor, size)
            if first is None:
                return [], size
            chunk = first // batch
            if not world.owns(chunk):
                cursor = world.next_owned(chunk) * batch
                continue
            end = min(size, (chunk + 1) * batch)
            work = self.covered.gaps(first, end)
            self.covered.update(work)
            self._hold(key, work)
            return work, end
        return [], size

    def _hold(self, key: StreamKey, work: list[tuple[int, int]]) -> None:
        self.inflight.setdefault(key, RangeSet()).update(work)

    def settle(self, ranges: list[tuple[int, int]], outcome: RangeSet) -> int:
        """Mark samples acknowledged, filtered or failed (``outcome``); how many were new."""
        before = len(outcome)
        for start, stop in ranges:
            start, stop = max(0, start), min(self.size, stop)
            if stop <= start:
                continue
            outcome.add(start, stop)
            self.covered.add(start, stop)
            self.pending.remove(start, stop)
            for held in self.inflight.values():
                held.remove(start, stop)
        return len(outcome) - before

    # -- counts --------------------------------------------------------------------------

    @property
    def inflight_count(self) -> int:
        """Samples held by streams."""
        return sum(len(held) for held in self.inflight.values())

    @property
    def done(self) -> bool:
        """Every sample of the rank is acknowledged, filtered or failed."""
        return len(self.acked) + len(self.filtered) + len(self.failed) >= self.size
