"""``RankState``: what one rank of one epoch has been handed, taken and finished.

All numbers are the rank's *local sequence numbers* (see ``plan``). The state is a plain
value: it is loaded from the catalog, changed by one operation, and saved, inside one
catalog transaction (``store``), so that every server on a shared catalog sees the same
truth. A sample is, at any time, in one of:

- not yet handed out (outside ``covered``);
- held by a stream (claimed for it; sent or about to be);
- pending (handed out before, to hand out again first: pushed back, or left by a stream
  that ended); ``orphaned`` is pending that any worker of the rank may take (its stream's
  lease ran out or its server died);
- finished (its batch completed, or a filter/failure dropped it where no batch spans it).

Apart from that, ``taken`` says which samples the training loop has reached (their batch
was handed to the loop): the progress a user sees follows the loop, not the read-ahead.
Filtered and failed samples are only counted here; which ones they were is known to the
server streaming them (``live``), and they are read and filtered again if handed out again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ...protocol.errors import InvalidArgument
from ...protocol.ranges import RangeSet
from .world import World

__all__ = ["Claim", "RankState", "StreamKey", "StreamState", "Unit", "stream_key"]

StreamKey = tuple[int, int] | tuple[int, int, str]
"""A stream of a rank: ``(worker, num_workers)``, plus the client's session when it named
one (``IterationTicket.session``): streams of other sessions share the rank's work."""


def stream_key(worker: int, num_workers: int, session: str = "") -> StreamKey:
    """The key of a stream (the session only when there is one)."""
    return (worker, num_workers, session) if session else (worker, num_workers)


def _session(key: StreamKey) -> str:
    return key[2] if len(key) > 2 else ""


Unit = list[tuple[int, int]]
"""The samples of one chunk (one batch), as ranges of local sequence numbers."""


def _by_chunk(ranges: list[tuple[int, int]], batch_size: int) -> list[Unit]:
    """Cut ranges at chunk boundaries and group the pieces by chunk, in order."""
    if all(ranges[i][1] <= ranges[i + 1][0] for i in range(len(ranges) - 1)):
        return _by_chunk_sorted(ranges, batch_size)
    units: dict[int, Unit] = {}
    for start, stop in ranges:
        while start < stop:
            chunk = start // batch_size
            end = min(stop, (chunk + 1) * batch_size)
            units.setdefault(chunk, []).append((start, end))
            start = end
    return [units[c] for c in sorted(units)]


def _by_chunk_sorted(ranges: list[tuple[int, int]], batch_size: int) -> list[Unit]:
    """``_by_chunk`` of ascending disjoint ranges: whole chunks of a long range in one go."""
    units: list[Unit] = []
    last = -1  # the chunk of units[-1]
    for start, stop in ranges:
        if start >= stop:
            continue
        chunk = start // batch_size
        end = min(stop, (chunk + 1) * batch_size)
        if chunk == last:
            units[-1].append((start, end))
        else:
            units.append([(start, end)])
        last = chunk
        if end < stop:  # the chunks after the first: whole ones, then maybe a partial one
            partial = stop - (stop - end) % batch_size
            units.extend([(a, a + batch_size)] for a in range(end, partial, batch_size))
            if partial < stop:
                units.append([(partial, stop)])
            last = (stop - 1) // batch_size
    return units


def merged(units: list[Unit]) -> list[tuple[int, int]]:
    """The ranges of some units (in order), touching ones joined: one ``add`` per run."""
    found: list[tuple[int, int]] = []
    for unit in units:
        for start, stop in unit:
            if found and found[-1][1] == start:
                found[-1] = (found[-1][0], stop)
            else:
                found.append((start, stop))
    return found


def _count(ranges: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)


@dataclass
class StreamState:
    """One stream's share of a rank: what it holds, which server serves it, until when.

    The serving server renews the lease while the stream's connection is open; the lease
    runs out only when that server is cut off (its heartbeat also says when it died).
    """

    generation: int
    node: str
    lease_until: float
    """Wall-clock time (shared by every server) after which its samples are freed."""
    held: RangeSet = field(default_factory=RangeSet)
    ended: bool = False
    """It sent all its work; what it holds waits for the loop's acks (or the lease)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON form saved in the catalog."""
        return {
            "generation": self.generation,
            "node": self.node,
            "lease_until": self.lease_until,
            "held": self.held.ranges(),
            "ended": self.ended,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamState:
        """Rebuild a stream from its JSON form."""
        return cls(
            generation=int(data["generation"]),
            node=str(data["node"]),
            lease_until=float(data["lease_until"]),
            held=RangeSet(data.get("held") or ()),
            ended=bool(data.get("ended", False)),
        )


def _stream_json(key: StreamKey, stream: StreamState) -> dict[str, Any]:
    data = stream.to_json()
    if _session(key):
        data["session"] = _session(key)
    return data


class Claim:
    """Work handed to a stream: its ranges, and one unit per chunk, in order.

    A claim of fresh work is a few ranges; its units (thousands of small lists for a
    small batch size) are cut from them when first asked for, after the catalog
    transaction that made the claim (not while it holds the catalog's write lock).
    """

    def __init__(
        self, ranges: list[tuple[int, int]], batch_size: int, units: list[Unit] | None = None
    ) -> None:
        self.ranges = ranges
        """The claimed samples as ascending ranges, touching ones joined."""
        self.batch_size = batch_size
        self._units = units

    @property
    def units(self) -> list[Unit]:
        """One unit per chunk, in order (cut from the ranges when first asked for)."""
        if self._units is None:
            self._units = _by_chunk_sorted(self.ranges, self.batch_size)
        return self._units

    @property
    def samples(self) -> int:
        """How many samples the claim holds."""
        return _count(self.ranges)


@dataclass
class RankState:
    """Progress of one rank in one epoch; see the module docstring for the terms."""

    size: int
    batch_size: int
    covered: RangeSet = field(default_factory=RangeSet)
    finished: RangeSet = field(default_factory=RangeSet)
    pending: RangeSet = field(default_factory=RangeSet)
    orphaned: RangeSet = field(default_factory=RangeSet)
    taken: RangeSet = field(default_factory=RangeSet)
    filtered: int = 0
    """Samples dropped by a filter (or an inner join) inside finished ranges."""
    failed: int = 0
    """Samples skipped after errors inside finished ranges."""
    streams: dict[StreamKey, StreamState] = field(default_factory=dict)
    next_generation: int = 1
    deal: int = 0
    """Which deal of the epoch the local seqs are of (``deals``; 0: the world it began with)."""

    # -- persistence ---------------------------------------------------------------------

    def to_json(self) -> str:
        """The JSON text saved in the catalog."""
        return json.dumps(
            {
                "size": self.size,
                "batch_size": self.batch_size,
                "covered": self.covered.ranges(),
                "finished": self.finished.ranges(),
                "pending": self.pending.ranges(),
                "orphaned": self.orphaned.ranges(),
                "taken": self.taken.ranges(),
                "filtered": self.filtered,
                "failed": self.failed,
                "streams": [
                    [k[0], k[1], _stream_json(k, s)] for k, s in sorted(self.streams.items())
                ],
                "next_generation": self.next_generation,
                **({"deal": self.deal} if self.deal else {}),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> RankState:
        """Rebuild a state from its JSON text."""
        data = json.loads(text)
        return cls(
            size=int(data["size"]),
            batch_size=int(data["batch_size"]),
            covered=RangeSet(data["covered"]),
            finished=RangeSet(data["finished"]),
            pending=RangeSet(data["pending"]),
            orphaned=RangeSet(data["orphaned"]),
            taken=RangeSet(data["taken"]),
            filtered=int(data["filtered"]),
            failed=int(data["failed"]),
            streams={
                stream_key(int(w), int(n), str(s.get("session", ""))): StreamState.from_json(s)
                for w, n, s in data["streams"]
            },
            next_generation=int(data["next_generation"]),
            deal=int(data.get("deal", 0)),
        )

    @classmethod
    def carried_over(
        cls,
        size: int,
        batch_size: int,
        acked: list[tuple[int, int]],
        filtered: int,
        failed: int,
    ) -> RankState:
        """A state from progress saved before epochs existed (catalog schema 4).

        What was acked is finished; what was in flight then is handed out again.
        """
        done = RangeSet(acked)
        return cls(
            size=size,
            batch_size=batch_size,
            covered=done.copy(),
            finished=done,
            taken=done.copy(),
            filtered=filtered,
            failed=failed,
        )

    # -- streams -------------------------------------------------------------------------

    def open_stream(
        self, key: StreamKey, node: str, lease_until: float, takeover: bool = False
    ) -> int:
        """Start a stream and return its generation.

        An earlier stream of the same worker (or of another worker count) of the same
        session is over, so what it held goes back to the queue; other sessions' streams
        go on (two clients sharing a rank each get their own part of it), unless
        ``takeover`` (a resumed job): then they are over too, what they held for any worker.
        """
        for other in list(self.streams):
            if _session(other) == _session(key):
                if other == key or other[1] != key[1]:
                    self.end_stream(other)
            elif takeover:
                self.end_stream(other, orphan=True)
        generation = self.next_generation
        self.next_generation += 1
        self.streams[key] = StreamState(generation, node, lease_until)
        return generation

    def stream(self, key: StreamKey, generation: int) -> StreamState | None:
        """The stream if it is still the current one of its worker (None: superseded/freed)."""
        found = self.streams.get(key)
        return found if found is not None and found.generation == generation else None

    def end_stream(self, key: StreamKey, orphan: bool = False) -> int:
        """A stream is over: what it holds and was not finished goes back to the queue.

        To pending (for the same worker's next stream) when it ended on its own; to
        ``orphaned`` (for any worker of the rank) when its client went away mid-stream.
        """
        stream = self.streams.pop(key, None)
        if stream is None:
            return 0
        return self._requeue(stream.held, self.orphaned if orphan else self.pending)

    def _requeue(self, held: RangeSet, into: RangeSet) -> int:
        count = 0
        for start, stop in held:
            for a, b in self.finished.gaps(start, stop):
                into.add(a, b)
                self.taken.remove(a, b)  # the loop will take them again
                count += b - a
        return count

    def pushback(self) -> int:
        """Return everything held by streams to the queue (the streams go on); how many."""
        count = 0
        for stream in self.streams.values():
            count += self._requeue(stream.held, self.pending)
            stream.held = RangeSet()
        for start, stop in self.orphaned.ranges():
            self.pending.add(start, stop)
        self.orphaned = RangeSet()
        return count

    def finish_stream(self, key: StreamKey) -> None:
        """A stream sent all its work: it stays, holding what the loop has not completed.

        Until the loop acknowledges that, or its lease runs out (no server renews it now).
        """
        stream = self.streams.get(key)
        if stream is not None:
            stream.ended = True
            if not stream.held:
                del self.streams[key]

    def expire(
        self, now: float, dead_nodes: frozenset[str] = frozenset(), orphan: bool = True
    ) -> int:
        """Free the samples of streams whose lease ran out or whose server died; how many.

        Freed samples can go to any worker of the rank (``orphan``), else to pending.
        """
        freed = 0
        for key, stream in list(self.streams.items()):
            if stream.lease_until < now or stream.node in dead_nodes:
                del self.streams[key]
                freed += self._requeue(stream.held, self.orphaned if orphan else self.pending)
        return freed

    @property
    def open_streams(self) -> int:
        """Streams still sending."""
        return sum(not s.ended for s in self.streams.values())

    def renew(self, streams: dict[StreamKey, int], lease_until: float) -> None:
        """Extend the leases of the given streams (by key and generation) that still exist."""
        for key, generation in streams.items():
            stream = self.stream(key, generation)
            if stream is not None:
                stream.lease_until = max(stream.lease_until, lease_until)

    @property
    def expires_at(self) -> float | None:
        """When the first stream's lease runs out (None: no stream)."""
        return min((s.lease_until for s in self.streams.values()), default=None)

    @property
    def nodes(self) -> list[str]:
        """The servers that serve this rank's streams."""
        return sorted({s.node for s in self.streams.values()})

    # -- handing out work ----------------------------------------------------------------

    def claim(self, stream: StreamState, world: World, max_chunks: int) -> Claim:
        """Up to ``max_chunks`` chunks for ``stream``, marked as held by it.

        Samples freed by dead streams come first, then pushed-back samples of chunks this
        worker owns, then the first chunks this worker owns that nobody had yet.
        """
        units = self._from(self.orphaned, max_chunks, world, any_worker=True)
        if not units:
            units = self._from(self.pending, max_chunks, world, any_worker=False)
        if units:
            claim = Claim(merged(units), self.batch_size, units)
        else:
            claim = Claim(self._fresh(world, max_chunks), self.batch_size)
        stream.held.update(claim.ranges)
        return claim

    def _from(
        self, source: RangeSet, max_chunks: int, world: World, any_worker: bool
    ) -> list[Unit]:
        if not source:
            return []
        taken: list[tuple[int, int]] = []
        chunks: set[int] = set()
        for start, stop in source.ranges():
            while start < stop:
                chunk = start // self.batch_size
                end = min(stop, (chunk + 1) * self.batch_size)
                owned = any_worker or world.owns(chunk)
                if owned and (chunk in chunks or len(chunks) < max_chunks):
                    taken.append((start, end))
                    chunks.add(chunk)
                start = end
        for start, stop in taken:
            source.remove(start, stop)
        return _by_chunk(taken, self.batch_size)

    def _fresh(self, world: World, max_chunks: int) -> list[tuple[int, int]]:
        """Up to ``max_chunks`` chunks nobody had, marked covered.

        As ascending ranges, touching ones joined.
        """
        found: list[tuple[int, int]] = []
        chunks, counted = 0, -1  # chunks claimed; the last one counted
        size, batch = self.size, self.batch_size
        cursor = 0
        while cursor < size and chunks < max_chunks:
            first = self.covered.first_gap_start(cursor, size)
            if first is None:
                break
            chunk = first // batch
            if not world.owns(chunk):
                cursor = world.next_owned(chunk) * batch
                continue
            # a run of chunks at once: one worker's are all; several: to its run's end
            span = min(max_chunks - chunks, world.run_left(chunk))
            end = min(size, (chunk + span) * batch)
            work = self.covered.gaps(first, end)
            self.covered.update(work)
            for start, stop in work:
                # the chunks these samples are in (two gaps may share one)
                low, high = start // batch, (stop - 1) // batch
                chunks += high - low + (low != counted)
                counted = high
                if found and found[-1][1] == start:
                    found[-1] = (found[-1][0], stop)
                else:
                    found.append((start, stop))
            cursor = end
        return found

    def release(self, stream: StreamState, ranges: list[tuple[int, int]], filtered: int,
                failed: int) -> None:  # fmt: skip
        """Samples a stream dropped (filtered, failed) where no batch spans them: finished."""
        for start, stop in ranges:
            stream.held.remove(start, stop)
            self.finished.add(start, stop)
        self.filtered += filtered
        self.failed += failed

    # -- what the loop reports -----------------------------------------------------------

    def check_sent(self, ranges: list[tuple[int, int]], what: str) -> None:
        """Refuse ranges this rank was never sent."""
        for start, stop in ranges:
            if start < 0 or stop > self.size or stop < start:
                raise InvalidArgument(
                    f"{what} [{start}, {stop}) is outside the rank's {self.size} samples"
                )
            never = self.covered.gaps(start, stop)
            if never:
                a, b = never[0]
                raise InvalidArgument(
                    f"{what} [{a}, {b}) were never sent to this rank: acknowledge only the "
                    "seq ranges of batches received"
                )

    def take(self, ranges: list[tuple[int, int]]) -> None:
        """The loop reached these batches.

        Only samples a stream holds count: a report that arrives after its stream ended
        (and the samples went back to the queue) is late news, and the loop will take them
        again when they come again.
        """
        self.check_sent(ranges, "taken samples")
        for stream in self.streams.values():
            for start, stop in ranges:
                self.taken.update(stream.held.intersection(start, stop))

    def complete(self, ranges: list[tuple[int, int]], filtered: int = 0, failed: int = 0) -> int:
        """The loop finished these batches (their spans, dropped samples inside included).

        ``filtered`` and ``failed`` say how many samples inside them were dropped (the
        server that streamed them knows). Answers how many delivered samples this newly
        finished.
        """
        self.check_sent(ranges, "completed samples")
        new = 0
        for start, stop in ranges:
            new += _count(self.finished.gaps(start, stop))
            self.finished.add(start, stop)
            self.taken.add(start, stop)
            self.pending.remove(start, stop)
            self.orphaned.remove(start, stop)
            for stream in self.streams.values():
                stream.held.remove(start, stop)
        for key, stream in list(self.streams.items()):
            if stream.ended and not stream.held:
                del self.streams[key]  # an ended stream the loop is done with
        self.filtered += filtered
        self.failed += failed
        return max(0, new - filtered - failed)

    # -- counts --------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Every sample of the rank is finished."""
        return len(self.finished) >= self.size

    @property
    def completed(self) -> int:
        """Delivered samples finished."""
        return len(self.finished) - self.filtered - self.failed

    @property
    def current(self) -> int:
        """Samples the loop has reached (dropped ones on the way included)."""
        reached = self.taken.copy()
        reached.update(self.finished.ranges())
        return len(reached)

    @property
    def inflight(self) -> RangeSet:
        """Taken by the loop, not finished."""
        found = RangeSet()
        for start, stop in self.taken:
            found.update(self.finished.gaps(start, stop))
        return found

    @property
    def read_ahead(self) -> int:
        """Held by streams ahead of the loop (claimed, not taken)."""
        total = 0
        for stream in self.streams.values():
            for start, stop in stream.held:
                total += _count(self.taken.gaps(start, stop))
        return total

    @property
    def pending_count(self) -> int:
        """Samples waiting to be handed out again."""
        return len(self.pending) + len(self.orphaned)
