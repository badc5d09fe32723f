"""``RankState``: what one rank of an iteration has been handed, and what it acknowledged.

All numbers here are the rank's *local sequence numbers* (see ``plan``). A sample is in
exactly one of: not yet handed out, pending (pushed back, to hand out again first), in
flight (held by a stream, not acknowledged), acknowledged, filtered, failed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..protocol.iterations import RankProgressRecord
from ..protocol.ranges import RangeSet
from .world import World

__all__ = ["RankState", "StreamKey", "Unit"]

StreamKey = tuple[int, int]
"""A stream of a rank: ``(worker, num_workers)``."""

Unit = list[tuple[int, int]]
"""The samples of one chunk (one batch), as ranges of local sequence numbers."""


def _by_chunk(ranges: list[tuple[int, int]], batch_size: int) -> list[Unit]:
    """Cut ranges at chunk boundaries and group the pieces by chunk, in order."""
    units: dict[int, Unit] = {}
    for start, stop in ranges:
        while start < stop:
            chunk = start // batch_size
            end = min(stop, (chunk + 1) * batch_size)
            units.setdefault(chunk, []).append((start, end))
            start = end
    return list(units.values())


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
    filtered_acked: int = 0
    """Filtered samples inside acknowledged ranges (no longer kept one by one)."""
    failed_acked: int = 0
    """Failed samples inside acknowledged ranges."""
    lease: float | None = None
    """Seconds a stream may hold samples without taking work or having them acked."""
    seen: dict[StreamKey, float] = field(default_factory=dict)
    orphaned: RangeSet = field(default_factory=RangeSet)
    """Samples of streams whose lease ran out: any worker of the rank takes them first."""

    @classmethod
    def restore(
        cls,
        record: RankProgressRecord | None,
        rank: int,
        size: int,
        batch_size: int,
        lease: float | None = None,
    ) -> RankState:
        """The state saved in the catalog; what was in flight then is handed out again."""
        state = cls(rank=rank, size=size, batch_size=batch_size, lease=lease)
        if record is not None:
            state.acked.update(record.acked)
            state.filtered.update(record.filtered)
            state.failed.update(record.failed)
            state.filtered_acked = record.filtered_acked
            state.failed_acked = record.failed_acked
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
            filtered_acked=self.filtered_acked,
            failed_acked=self.failed_acked,
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
        self.seen[key] = time.monotonic()
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
        count = sum(self._requeue(key) for key in list(self.inflight))
        self.pending.update(self.orphaned.ranges())
        self.orphaned = RangeSet()
        return count

    def expire(self, now: float | None = None) -> int:
        """Free the samples of streams whose lease ran out (a dead client); how many.

        A stream renews its lease each time it takes work and each time samples it holds
        are acknowledged. Freed samples can go to any worker of the rank.
        """
        if self.lease is None:
            return 0
        now = time.monotonic() if now is None else now
        freed = 0
        for key, held in list(self.inflight.items()):
            if held and now - self.seen.get(key, now) > self.lease:
                self.inflight.pop(key)
                self.orphaned.update(held.ranges())
                freed += len(held)
        return freed

    @property
    def pending_count(self) -> int:
        """Samples waiting to be handed out again (pushed back or freed by the lease)."""
        return len(self.pending) + len(self.orphaned)

    def next_work(
        self, world: World, key: StreamKey, cursor: int, max_chunks: int = 1
    ) -> tuple[list[Unit], int]:
        """Up to ``max_chunks`` chunks for a stream, marked in flight; and the new cursor.

        Each unit is one chunk's samples (one batch), as ranges. Pushed-back samples of
        chunks this worker owns come first; then the chunks at or after ``cursor`` with
        samples nobody has.
        """
        self.expire()
        self.seen[key] = time.monotonic()
        units = self._orphaned_units(max_chunks) or self._pending_units(world, max_chunks)
        if units:
            for unit in units:
                self._hold(key, unit)
            return units, cursor
        size, batch = self.size, self.batch_size
        while cursor < size and len(units) < max_chunks:
            first = self.covered.first_gap_start(cursor, size)
            if first is None:
                return units, size
            chunk = first // batch
            if not world.owns(chunk):
                cursor = world.next_owned(chunk) * batch
                continue
            # one worker: take a run of chunks at once; several: only the owned chunk
            span = max_chunks - len(units) if world.num_workers == 1 else 1
            end = min(size, (chunk + span) * batch)
            work = self.covered.gaps(first, end)
            self.covered.update(work)
            self._hold(key, work)
            units.extend(_by_chunk(work, batch))
            cursor = end
        return units, cursor

    def _orphaned_units(self, max_chunks: int) -> list[Unit]:
        units = _by_chunk(self.orphaned.ranges(), self.batch_size)[:max_chunks]
        for unit in units:
            for start, stop in unit:
                self.orphaned.remove(start, stop)
        return units

    def _pending_units(self, world: World, max_chunks: int) -> list[Unit]:
        taken: list[tuple[int, int]] = []
        chunks: set[int] = set()
        for start, stop in self.pending.ranges():
            chunk = start // self.batch_size
            while start < stop:
                end = min(stop, (chunk + 1) * self.batch_size)
                if world.owns(chunk) and (chunk in chunks or len(chunks) < max_chunks):
                    taken.append((start, end))
                    chunks.add(chunk)
                chunk += 1
                start = chunk * self.batch_size
        for start, stop in taken:
            self.pending.remove(start, stop)
        return _by_chunk(taken, self.batch_size)

    def _hold(self, key: StreamKey, work: list[tuple[int, int]]) -> None:
        self.inflight.setdefault(key, RangeSet()).update(work)

    def acknowledge(self, ranges: list[tuple[int, int]]) -> int:
        """Mark consumed ranges done; how many delivered samples that completed.

        A batch's ranges also span the samples filtered (or failed) on its way, so
        acknowledged ranges stay contiguous; those samples move from the ``filtered`` and
        ``failed`` sets into counters.
        """
        folded = 0
        for start, stop in ranges:
            for part, attr in ((self.filtered, "filtered_acked"), (self.failed, "failed_acked")):
                inside = sum(b - a for a, b in part.intersection(start, stop))
                if inside:
                    part.remove(start, stop)
                    setattr(self, attr, getattr(self, attr) + inside)
                    folded += inside
        return self.settle(ranges, self.acked) - folded

    def release(self, key: StreamKey, ranges: list[tuple[int, int]]) -> None:
        """A stream no longer holds these (filtered or failed) samples."""
        held = self.inflight.get(key)
        if held is not None:
            for start, stop in ranges:
                held.remove(start, stop)

    def settle(self, ranges: list[tuple[int, int]], outcome: RangeSet, release: bool = True) -> int:
        """Mark samples acknowledged, filtered or failed (``outcome``); how many were new.

        ``release=False`` leaves them with the stream that holds them (the batch that spans
        them will be acknowledged): cheap for the many small ranges a filter leaves.
        """
        before = len(outcome)
        for start, stop in ranges:
            start, stop = max(0, start), min(self.size, stop)
            if stop <= start:
                continue
            outcome.add(start, stop)
            self.covered.add(start, stop)
            if not release:
                continue
            self.pending.remove(start, stop)
            self.orphaned.remove(start, stop)
            now = time.monotonic()
            for key, held in self.inflight.items():
                if held.intersection(start, stop):
                    self.seen[key] = now
                held.remove(start, stop)
        return len(outcome) - before

    # -- counts --------------------------------------------------------------------------

    @property
    def inflight_count(self) -> int:
        """Samples held by streams."""
        return sum(len(held) for held in self.inflight.values())

    @property
    def completed(self) -> int:
        """Delivered samples acknowledged."""
        return len(self.acked) - self.filtered_acked - self.failed_acked

    @property
    def filtered_count(self) -> int:
        """Samples a filter dropped."""
        return self.filtered_acked + len(self.filtered)

    @property
    def failed_count(self) -> int:
        """Samples skipped after errors."""
        return self.failed_acked + len(self.failed)

    @property
    def done(self) -> bool:
        """Every sample of the rank is acknowledged, filtered or failed."""
        return len(self.acked) + len(self.filtered) + len(self.failed) >= self.size
