"""Read-ahead: how far a server runs ahead of a training loop, and what it knows of it.

A client that reports the batches its loop *takes* (a windowed stream) lets the server
bound what it holds ahead of the loop: about ``seconds`` of the loop's recent pace, never
more than ``max_bytes``, never less than ``min_batches`` batches. That bound is what a
crash or a pushback can repeat. ``RankFlow`` is one server's view of one rank's loop in one
epoch: the streams it serves for that rank, what they hold, what the loop took, and the
samples dropped (filtered, failed) inside batches the loop has not completed yet.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ...protocol.ranges import RangeSet
from .samples import SampleSet
from .state import RankState
from .store import StreamHandle

__all__ = ["RankFlow", "ReadAhead"]

GROWTH = 2
"""How much a window may grow at one report of a loop that is still busy with what it holds."""
STARVED_GROWTH = 8
"""How much it may grow at one report of a loop that has taken (nearly) all it was sent: the
loop waits on the stream, and each doubling would cost it a round trip."""
STARVED = 0.25
"""A loop holding less than this part of its window ahead of it at a report is starved."""


@dataclass(frozen=True)
class ReadAhead:
    """The read-ahead budget of windowed streams."""

    seconds: float = 0.5
    """Of the loop's recent pace."""
    max_bytes: int = 64 << 20
    min_batches: int = 2

    def describe(self) -> str:
        """The bound in words (for the server's banner and the docs)."""
        return (
            f"about {self.seconds:g} s of each loop's pace, at most "
            f"{self.max_bytes >> 20} MiB, at least {self.min_batches} batches"
        )


class RankFlow:
    """What this server knows of one rank's loop in one epoch (see the module docstring).

    Every method is called with ``cond`` held unless it says otherwise.
    """

    def __init__(
        self,
        batch_size: int,
        budget: ReadAhead,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.batch_size = batch_size
        self.budget = budget
        self.clock = clock
        self.cond = threading.Condition()
        self.ack_lock = threading.Lock()
        """Serializes acks of the rank (counting dropped samples, then saving)."""
        self.taken = RangeSet()
        self.held: dict[StreamHandle, RangeSet] = {}
        self.sent: dict[StreamHandle, RangeSet] = {}
        """The spans of the batches each stream sent (what the loop may take)."""
        self.windowed: set[StreamHandle] = set()
        self.filtered = SampleSet()
        self.failed = SampleSet()
        self.row_bytes: float | None = None
        self.stale = False
        """Set when the catalog changed under the streams (a pushback): re-read it."""
        self._pace: deque[tuple[float, int]] = deque()
        self._window = budget.min_batches * batch_size

    # -- the budget ----------------------------------------------------------------------

    def _ahead_of(self, handle: StreamHandle) -> RangeSet:
        """What one stream sent, still holds, and the loop has not taken."""
        found = RangeSet()
        held = self.held.get(handle, RangeSet())
        for start, stop in self.sent.get(handle, RangeSet()):
            for a, b in held.intersection(start, stop):
                found.update(self.taken.gaps(a, b))
        return found

    def ahead(self, handle: StreamHandle | None = None) -> int:
        """Samples the streams here (or one of them) sent ahead of the loop.

        Sent, held (not pushed back), not taken. What a stream claimed and did not send
        yet (rows a filter is thinning into a batch) is not ahead of the loop.
        """
        handles = [handle] if handle is not None else list(self.held)
        return sum(len(self._ahead_of(h)) for h in handles)

    def pace(self) -> float | None:
        """Samples the loop took per second lately (None: not known yet)."""
        if len(self._pace) < 2:
            return None
        (t0, n0), (t1, n1) = self._pace[0], self._pace[-1]
        return (n1 - n0) / (t1 - t0) if t1 - t0 >= 0.005 else None

    def window(self) -> int:
        """Samples the streams may hold ahead of the loop (see ``_rewindow``)."""
        return self._window

    def _rewindow(self) -> None:
        """About ``seconds`` of the loop's pace, growing a bounded factor at each report.

        The bounded growth keeps a burst of first batches (a loop not yet busy) from sizing the
        window; a loop that keeps up grows it geometrically, one report at a time. Before
        the pace is known (its reports span less than a few milliseconds: a fast loop's
        first batches) the window grows so too: a loop that reports this fast is waiting on
        the stream, and holding it at the minimum would cost a round trip per batch. A loop
        that has taken nearly all it was sent (less than ``STARVED`` of its window ahead of
        it) is waiting on the stream: its window grows ``STARVED_GROWTH``-fold; a loop busy
        with what it holds, ``GROWTH``-fold (a slow loop's burst of first reports cannot
        blow its window up past twice its pace).
        """
        low = self.budget.min_batches * self.batch_size
        high = max(low, int(self.budget.max_bytes / (self.row_bytes or 1024)))
        starved = self.ahead() < STARVED * self._window
        growth = (STARVED_GROWTH if starved else GROWTH) * self._window
        pace = self.pace()
        wanted = growth if pace is None else int(pace * self.budget.seconds)
        self._window = max(low, min(high, wanted, growth))

    def share(self) -> int:
        """The part of the window each windowed stream may hold (never below the minimum).

        Each stream has its own share: a DataLoader takes its workers' batches in turn, so
        one worker's stream must never wait for room another's holds.
        """
        low = self.budget.min_batches * self.batch_size
        return max(low, self.window() // max(1, len(self.windowed)))

    def room(self, handle: StreamHandle) -> int:
        """Samples one windowed stream may claim now."""
        return max(0, self.share() - self.ahead(handle))

    # -- what happens ---------------------------------------------------------------------

    def claimed(self, handle: StreamHandle, ranges: list[tuple[int, int]]) -> None:
        """A stream here claimed samples."""
        self.held.setdefault(handle, RangeSet()).update(ranges)

    def released(self, handle: StreamHandle, ranges: list[tuple[int, int]]) -> None:
        """A stream here no longer holds samples."""
        held = self.held.get(handle)
        if held is not None:
            for start, stop in ranges:
                held.remove(start, stop)

    def went_out(
        self, handle: StreamHandle, spans: list[tuple[int, int]], rows: int, nbytes: int
    ) -> None:
        """A message went out: its batches' spans, and the size of a row."""
        self.sent.setdefault(handle, RangeSet()).update(spans)
        if rows:
            size = nbytes / max(1, sum(b - a for a, b in spans))
            self.row_bytes = size if self.row_bytes is None else 0.8 * self.row_bytes + 0.2 * size

    def learn(self, state: RankState) -> None:
        """The rank's state as the catalog has it now: what was taken, what streams hold."""
        before = len(self.taken)
        self.taken = state.taken.copy()
        for start, stop in state.finished:
            self.taken.add(start, stop)
        for handle in list(self.held):
            stream = state.stream(handle.key, handle.generation)
            self.held[handle] = stream.held.copy() if stream is not None else RangeSet()
        # what the loop took is never ahead of it: the spans sent keep only the rest, so
        # ``ahead`` walks the batches in flight, not every batch of the epoch (a worker's
        # share, every other batch, made a range per batch: 16 % of a server's time went
        # to walking them, late in an epoch of two workers)
        for sent in self.sent.values():
            for start, stop in self.taken:
                sent.remove(start, stop)
        now = self.clock()
        moved = len(self.taken) != before
        if moved or not self._pace or now - self._pace[-1][0] >= 0.1:
            self._pace.append((now, len(self.taken)))  # a pause slows the pace down too
        while len(self._pace) > 2 and now - self._pace[0][0] > 2.0:
            self._pace.popleft()
        if moved:
            self._rewindow()
        self.stale = False
        self.cond.notify_all()

    def dropped_in(self, ranges: list[tuple[int, int]]) -> tuple[SampleSet, SampleSet]:
        """The filtered and failed samples inside ``ranges`` that streams here dropped.

        Sample sets, not range sets: a filter keeping every other sample leaves as many
        holes as samples (see ``samples``).
        """
        return self.filtered.within(ranges), self.failed.within(ranges)

    def forget(self, dropped: tuple[SampleSet, SampleSet]) -> None:
        """Dropped samples now counted in the catalog."""
        self.filtered.discard(dropped[0])
        self.failed.discard(dropped[1])
