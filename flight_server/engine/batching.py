"""Batching: the messages of one stream, from the work it claims to the batches it sends.

Two batchers share one contract (``Work``: claim work within the read-ahead budget, release
samples no batch will span). ``PlainBatcher`` sends rows as read: its batches are the
chunks claimed. ``TransformedBatcher`` takes what the iteration's filters leave (filtered
once per block on the read threads, see ``blocks``), packs it into full batches and
collates/preprocesses them; its batches *span* the samples dropped on their way, so that
what a loop acknowledges stays a few contiguous ranges.

Several batches travel in one Flight message (about ``MESSAGE_BYTES``): per-message costs
are paid once for many small batches. The first message holds one batch, so the first
batch arrives as soon as possible. A claim holds several messages' work (fewer catalog
transactions). A message is a zero-copy slice of a block where its rows run in one piece
(one rank, one worker); rows from several places (several ranks or workers) are copied
once, into the message. The messages sent once the stream has claimed its worker's last
sample are marked ``final``: the loop reports them at once, so that the end of the stream
(which waits for the loop to take what it sent) does not wait for a report timer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa

from ...protocol.ranges import as_array, runs
from ...transforms import Outcome
from ..memory import Reservation
from .blocks import Kept, Rows
from .plan import EpochPlan
from .samples import SampleSet
from .state import Unit, merged
from .world import World

__all__ = [
    "MESSAGE_BYTES",
    "Message",
    "PlainBatcher",
    "Source",
    "TransformedBatcher",
    "Work",
]

MESSAGE_BYTES = 4 << 20
MESSAGE_ROWS = 1 << 16
MAX_CHUNKS = 512
CLAIM_MESSAGES = 8
"""A claim asks for up to this many messages' chunks (within the read-ahead budget)."""
MAX_CLAIM_SCALE = 8.0
"""A filtered stream claims at most this many times the chunks of an unfiltered one."""

Ranges = list[tuple[int, int]]


class Work(Protocol):
    """What a batcher asks of the stream it feeds."""

    def claim(self, max_chunks: int) -> list[Unit]:
        """Up to ``max_chunks`` chunks; empty when there is no more work for this stream.

        Waits while the read-ahead budget is spent.
        """
        ...

    def room(self) -> int:
        """Samples the stream may claim now without waiting (a large number: no budget)."""
        ...

    def release(self, ranges: Ranges, filtered: int, failed: int) -> None:
        """Samples dropped where no batch will span them (the end of the stream)."""
        ...

    def check(self) -> None:
        """Raise when the stream is to stop (its client went away); called while it waits."""
        ...


class Source(Protocol):
    """Where a batcher's rows come from (``blocks.BlockReader``).

    ``check`` is called while rows are waited for, and raises to stop the wait (the
    stream's ``Work.check``).
    """

    def rows(
        self, plan: EpochPlan, seq: np.ndarray, check: Callable[[], None] | None = None
    ) -> Rows:
        """Rows of ascending global sequence numbers."""
        ...

    def kept(
        self, plan: EpochPlan, seq: np.ndarray, check: Callable[[], None] | None = None
    ) -> Kept:
        """What the iteration's filters leave of ascending global sequence numbers."""
        ...

    def boundary(self, plan: EpochPlan, seq: int) -> int:
        """The first global sequence number after ``seq`` in another table of rows."""
        ...

    def hold_read_ahead(self) -> Reservation:
        """Reserve, in the memory budget, what one stream may hold ahead of its loop."""
        ...


@dataclass
class Message:
    """One Flight message: the rows of consecutive batches, and what they carry.

    ``batches``: each batch's row count and the local sequence ranges it spans (what the
    loop acknowledges). ``seq``: the global sequence numbers of the rows, in order.
    ``filtered``/``failed``: samples dropped inside those spans (counted when the spanning
    batch is completed). ``final``: sent after the stream claimed its last sample (the
    loop should report it at once).
    """

    batch: pa.RecordBatch
    batches: list[tuple[int, Ranges]]
    seq: np.ndarray
    filtered: SampleSet = field(default_factory=SampleSet)
    failed: SampleSet = field(default_factory=SampleSet)
    final: bool = False

    @property
    def samples(self) -> int:
        """Samples the message's batches span."""
        return sum(b - a for _, ranges in self.batches for a, b in ranges)


def _one_batch(table: pa.Table, schema: pa.Schema) -> pa.RecordBatch:
    """A table as one record batch (a copy only when its columns have several chunks)."""
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else schema.empty_table().to_batches()[0]


def _message_chunks(message: pa.RecordBatch, batch_size: int) -> int:
    """How many chunks the next message should hold, from the size of this one's rows."""
    if not message.num_rows:
        return 1
    row_bytes = max(1, message.nbytes // message.num_rows)
    return max(
        1,
        min(MAX_CHUNKS, MESSAGE_BYTES // (row_bytes * batch_size), MESSAGE_ROWS // batch_size),
    )


def last_owned(plan: EpochPlan, world: World) -> int | None:
    """The last local sequence number of the partition that this stream's worker owns."""
    size = plan.partition_size(world.partition)
    if not size:
        return None
    chunk = (size - 1) // plan.batch_size
    while chunk >= 0 and not world.owns(chunk):
        chunk -= 1
    if chunk < 0:
        return None
    return min(size, (chunk + 1) * plan.batch_size) - 1


def _holds(units: list[Unit], sample: int | None) -> bool:
    return sample is not None and any(a <= sample < b for unit in units for a, b in unit)


class PlainBatcher:
    """Rows as read: each claimed chunk is one batch.

    Rows of unreadable shards that are skipped leave the batches and are released as failed.
    """

    def __init__(
        self,
        plan: EpochPlan,
        blocks: Source,
        world: World,
        work: Work,
        schema: pa.Schema,
    ) -> None:
        self.plan = plan
        self.blocks = blocks
        self.world = world
        self.work = work
        self.schema = schema
        self.partition = world.partition
        # one partition, read by one worker or by workers in runs of chunks: its chunks
        # (of a run) are consecutive global rows, a message of them is a slice of a block
        self._contiguous = world.num_partitions == 1 and (
            world.num_workers == 1 or world.worker_chunks > 1
        )

    def _take(self, queue: list[Unit], chunks: int) -> list[Unit]:
        """The next message's units: up to ``chunks``, stopping where its rows change table.

        A unit whose rows straddle two tables (a chunk across two blocks) goes alone: only
        its rows are copied into one batch. A message also ends where the next unit's rows
        do not follow (a worker's next run of chunks).
        """
        if not self._contiguous or len(queue) == 1:
            found, queue[:] = queue[:chunks], queue[chunks:]
            return found
        # one partition, one worker: local and global sequence numbers differ by a constant
        shift = int(self.plan.to_global(self.partition, np.array([0]))[0])
        stop = self.blocks.boundary(self.plan, queue[0][0][0] + shift)
        count = 0
        while count < min(chunks, len(queue)):
            if queue[count][-1][1] + shift > stop:  # its rows go past the boundary
                count = count or 1
                break
            if count and queue[count][0][0] != queue[count - 1][-1][1]:  # a gap: not a slice
                break
            count += 1
        found, queue[:] = queue[:count], queue[count:]
        return found

    def __iter__(self) -> Iterator[Message]:
        batch_size = self.plan.batch_size
        last = last_owned(self.plan, self.world)
        chunks = 1
        first = True  # the first claim holds one chunk: the first batch comes soon
        queue: list[Unit] = []
        claimed_last = False
        hold = self.blocks.hold_read_ahead()
        try:
            while True:
                if not queue:
                    # later ones several messages' worth, also when a message is one chunk
                    # (4 KiB rows: asking for one chunk made a claim, a catalog
                    # transaction, of every message)
                    ask = 1 if first else chunks * CLAIM_MESSAGES
                    first = False
                    # claim() caps it by the room there is once it waited for room
                    units = self.work.claim(max(1, ask))
                    if not units:
                        return
                    claimed_last = claimed_last or _holds(units, last)
                    queue = list(units)
                units = self._take(queue, chunks)
                # touching chunks joined first: a message of consecutive rows is one arange
                local = as_array(merged(units))
                seq = self.plan.to_global(self.partition, local)
                # a left join: no sample is left out
                rows = self.blocks.rows(self.plan, seq, self.work.check)
                batches = [(sum(b - a for a, b in unit), unit) for unit in units]
                table = rows.table
                if rows.unreadable is not None and rows.unreadable.any():
                    bad = rows.unreadable
                    dropped = runs(local[bad])
                    assert dropped is not None
                    self.work.release(dropped, 0, int(bad.sum()))
                    table, local, seq = table.filter(pa.array(~bad)), local[~bad], seq[~bad]
                    batches = _without(batches, local)
                    if not batches:
                        continue
                message = Message(_one_batch(table, self.schema), batches, seq)
                if claimed_last and not queue:
                    yield from _with_final_batch(message)
                else:
                    yield message
                chunks = _message_chunks(message.batch, batch_size)
        finally:
            hold.release()


def _with_final_batch(message: Message) -> Iterator[Message]:
    """A message, its last batch apart and ``final`` (the loop reports that one at once).

    Only the last batch: a loop that reported every batch of a long final message would
    send one report per batch.
    """
    if len(message.batches) == 1:
        message.final = True
        yield message
        return
    rows = message.batches[-1][0]
    head = message.batch.num_rows - rows
    first_seq = message.seq[:head] if len(message.seq) == message.batch.num_rows else message.seq
    # what was dropped inside the last batch's span is counted when that batch is completed
    last = message.batches[-1][1]
    filtered, failed = message.filtered.pop_within(last), message.failed.pop_within(last)
    yield Message(message.batch.slice(0, head), message.batches[:-1], first_seq,
                  message.filtered, message.failed)  # fmt: skip
    yield Message(
        message.batch.slice(head), message.batches[-1:], message.seq[head:], filtered, failed, True
    )


def _without(batches: list[tuple[int, Ranges]], kept: np.ndarray) -> list[tuple[int, Ranges]]:
    """Batch descriptions keeping only the sequence numbers in ``kept`` (dropping empties)."""
    result = []
    for _, unit in batches:
        values = as_array(unit)
        values = values[np.isin(values, kept, assume_unique=True)]
        if len(values):
            found = runs(values)
            assert found is not None
            result.append((len(values), found))
    return result


Process = Callable[[list[pa.RecordBatch]], list[Outcome]]
"""Collate and preprocess batches (in worker processes or here), in order."""


Segment = tuple[pa.Table, int, int]
"""``(table, offset, rows)``: a slice of rows, kept apart from its table until it is sent."""


@dataclass
class _Carried:
    """Kept rows waiting to fill a batch: a slice of a table, its samples' numbers and ordinals."""

    table: pa.Table
    offset: int
    local: np.ndarray
    ordinals: np.ndarray

    def follows(self, table: pa.Table, offset: int) -> bool:
        """Whether rows of ``table`` from ``offset`` come right after these."""
        return table is self.table and offset == self.offset + len(self.local)


@dataclass
class _Batch:
    """One batch of kept rows: its slices (two when it straddles tables), numbers, ordinals."""

    segments: list[Segment]
    local: np.ndarray
    ordinals: np.ndarray

    def table(self) -> pa.Table:
        tables = [t.slice(o, n) for t, o, n in self.segments]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


class TransformedBatcher:
    """Filtered, collated or preprocessed batches.

    Invariant: every sample the stream claimed is either spanned by a batch already sent,
    or *consumed* and not yet spanned (``_consumed``, in claim order; the first has ordinal
    ``_offset``). Of the consumed ones, those that stay wait in ``_carried`` (rows, their
    local sequence numbers and ordinals) to fill a batch; the others were dropped and are
    listed in ``_filtered``/``_failed``. A batch spans every consumed sample up to its last
    row, so the spans a loop acknowledges cover every claimed sample exactly once.

    Args:
        process: collates and preprocesses batches; None when the iteration only filters
            (its batches are then slices of the kept rows, several per message).
        rowwise: the processing makes each row from its own row alone
            (``Pipeline.rowwise``): the rows of one message's batches are then processed
            in one call, whose result is the message (no copy of the processed rows).
    """

    def __init__(
        self,
        plan: EpochPlan,
        blocks: Source,
        world: World,
        work: Work,
        process: Process | None,
        schema: pa.Schema,
        first_chunks: int = 1,
        max_chunks: int = MAX_CHUNKS,
        rowwise: bool = False,
    ) -> None:
        self.plan = plan
        self.blocks = blocks
        self.world = world
        self.work = work
        self.process = process
        self.schema = schema
        self.first_chunks = first_chunks
        self.max_chunks = max_chunks
        self.rowwise = rowwise
        self._row_bytes = 0
        """Bytes of a processed row, as the last processed message had them (0: unknown)."""
        self.partition = world.partition
        self._consumed = np.zeros(0, dtype=np.int64)
        self._offset = 0
        self._next = 0
        self._kept = 0
        """Samples kept of the ``_next`` consumed (what the claims are scaled by)."""
        self._carried: list[_Carried] = []
        self._filtered = SampleSet()
        self._failed = SampleSet()
        self._final = False

    # -- taking work in ------------------------------------------------------------------

    def _take_in(self, units: list[Unit]) -> None:
        local = as_array(merged(units))
        first = self._next
        self._next += len(local)
        self._consumed = np.concatenate([self._consumed, local])
        seq = self.plan.to_global(self.partition, local)
        kept = self.blocks.kept(self.plan, seq, self.work.check)
        # (positions, not boolean masks, pick the values: numpy's masked copy takes 4 times
        # as long on a mask that keeps every other sample; a sample set sorts what it is
        # given only when it is out of order)
        if kept.failed.any():
            self._failed.add(local[np.flatnonzero(kept.failed)])
            self._filtered.add(local[np.flatnonzero(~kept.kept & ~kept.failed)])
        else:
            self._filtered.add(local[np.flatnonzero(~kept.kept)])
        chosen = np.flatnonzero(kept.kept)
        self._kept += len(chosen)
        local, ordinals = local[chosen], chosen + first
        start = 0
        for table, offset, rows in kept.parts:
            part_local, part_ord = local[start : start + rows], ordinals[start : start + rows]
            start += rows
            last = self._carried[-1] if self._carried else None
            if last is not None and last.follows(table, offset):  # one slice again
                last.local = np.concatenate([last.local, part_local])
                last.ordinals = np.concatenate([last.ordinals, part_ord])
            else:
                self._carried.append(_Carried(table, offset, part_local, part_ord))

    @property
    def _pending(self) -> int:
        return sum(len(c.local) for c in self._carried)

    # -- batches out ---------------------------------------------------------------------

    def _spans(self, lasts: list[int]) -> list[Ranges]:
        """The spans of consecutive batches that end at ordinals ``lasts`` (ascending).

        Each batch spans every consumed sample up to its last ordinal that no batch spans
        yet, as ``[start, stop)`` runs. One pass over a message's batches: a batch at a
        time, finding its runs was a tenth of a filtered stream's thread.
        """
        if not lasts:
            return []
        ends = np.asarray(lasts, dtype=np.int64) + 1 - self._offset
        total = int(ends[-1])
        span, self._consumed = self._consumed[:total], self._consumed[total:]
        self._offset = int(lasts[-1]) + 1
        starts = np.concatenate(([0], ends[:-1]))
        if len(span) > 1 and not bool((span[1:] > span[:-1]).all()):
            # out of order somewhere (work claimed back): each batch's samples sorted apart
            found: list[Ranges] = []
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                ranges = runs(np.sort(span[a:b]))
                assert ranges is not None
                found.append(ranges)
            return found
        # ascending: a run ends where the next number is not one more, or a batch ends
        cuts = np.union1d(np.flatnonzero(np.diff(span) != 1) + 1, starts[1:])
        first = np.concatenate(([0], cuts))
        last = np.concatenate((cuts, [total])) - 1
        owners = np.searchsorted(ends, first, side="right")
        spans: list[Ranges] = [[] for _ in lasts]
        for owner, a, b in zip(
            owners.tolist(), span[first].tolist(), (span[last] + 1).tolist(), strict=True
        ):
            spans[owner].append((a, b))
        return spans

    def _spanned(
        self, rows: list[int], lasts: list[int]
    ) -> tuple[list[tuple[int, Ranges]], SampleSet, SampleSet]:
        """A message's batches with their spans, and the samples dropped inside them.

        ``rows``: each batch's rows; ``lasts``: the ordinal each ends at. The dropped samples
        leave the waiting lists.
        """
        spans = self._spans(lasts)
        filtered, failed = self._dropped_in([r for span in spans for r in span])
        return list(zip(rows, spans, strict=True)), filtered, failed

    def _dropped_in(self, span: Ranges) -> tuple[SampleSet, SampleSet]:
        """The dropped samples inside a span, taken out of the waiting lists."""
        return self._filtered.pop_within(span), self._failed.pop_within(span)

    def _batches(self, count: int) -> list[_Batch]:
        """The next ``count`` carried rows, cut into batches."""
        size = self.plan.batch_size
        found: list[_Batch] = []
        segments: list[Segment] = []
        locals_: list[np.ndarray] = []
        ordinals: list[np.ndarray] = []
        want, left = size, count
        while left > 0:
            head = self._carried[0]
            n = min(want, len(head.local), left)
            segments.append((head.table, head.offset, n))
            locals_.append(head.local[:n])
            ordinals.append(head.ordinals[:n])
            if n == len(head.local):
                self._carried.pop(0)
            else:
                head.offset += n
                head.local, head.ordinals = head.local[n:], head.ordinals[n:]
            want -= n
            left -= n
            if want == 0 or left == 0:
                if len(locals_) == 1:
                    found.append(_Batch(segments, locals_[0], ordinals[0]))
                else:
                    found.append(
                        _Batch(segments, np.concatenate(locals_), np.concatenate(ordinals))
                    )
                segments, locals_, ordinals, want = [], [], [], size
        return found

    def _cut(self, final: bool) -> list[Message]:
        """Full batches of the carried rows (at the end, the partial one too), processed."""
        batch_size = self.plan.batch_size
        pending = self._pending
        full = pending if final else pending // batch_size * batch_size
        if not full:
            return []
        cut = self._batches(full)
        if self.process is None:
            return self._sliced(cut)
        if self.rowwise:
            return self._together(cut)
        inputs = [_one_batch(batch.table(), self.schema) for batch in cut]
        messages: list[Message] = []
        pieces: list[pa.RecordBatch] = []
        rows: list[int] = []
        lasts: list[int] = []
        delivered: list[np.ndarray] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if not pieces:
                return
            batches, filtered, failed = self._spanned(rows, lasts)
            seq = self.plan.to_global(self.partition, np.concatenate(delivered))
            if len(pieces) == 1:
                message = pieces[0]
            else:
                message = _one_batch(pa.Table.from_batches(pieces), pieces[0].schema)
            messages.append(Message(message, batches, seq, filtered, failed))
            pieces.clear()
            rows.clear()
            lasts.clear()
            delivered.clear()
            size = 0

        for batch, outcome in zip(cut, self.process(inputs), strict=True):
            lost = np.zeros(len(batch.local), dtype=bool)
            lost[outcome.failed] = True
            self._failed.add(np.sort(batch.local[lost]))
            if outcome.result is None or (lost.all() and not outcome.result.num_rows):
                continue  # the next batch's span takes these in
            result = outcome.result
            if pieces and (size + result.nbytes > MESSAGE_BYTES or len(pieces) >= MAX_CHUNKS):
                flush()  # a message of about MESSAGE_BYTES: one copy of a few MB, not of all
            if pieces and not result.schema.equals(pieces[0].schema):
                result = result.cast(pieces[0].schema)
            pieces.append(result)
            size += result.nbytes
            rows.append(result.num_rows)
            lasts.append(int(batch.ordinals[-1]))
            delivered.append(batch.local[~lost])
        flush()
        return messages

    def _together(self, cut: list[_Batch]) -> list[Message]:
        """Batches processed a message at a time: one call on their rows, its result sent.

        A message takes as many batches as about ``MESSAGE_BYTES`` of processed rows hold
        (as the last message's rows weighed; one batch while that is unknown).
        """
        messages: list[Message] = []
        size = self.plan.batch_size
        while cut:
            rows = MESSAGE_BYTES // self._row_bytes if self._row_bytes else 1
            count = max(1, min(len(cut), MAX_CHUNKS, rows // size))
            group, cut = cut[:count], cut[count:]
            message = self._processed(group)
            if message is not None:
                messages.append(message)
        return messages

    def _processed(self, group: list[_Batch]) -> Message | None:
        """One message of batches processed together (None when every row failed)."""
        assert self.process is not None
        segments: list[Segment] = []
        for batch in group:
            for table, offset, rows in batch.segments:
                last = segments[-1] if segments else None
                if last is not None and last[0] is table and last[1] + last[2] == offset:
                    segments[-1] = (table, last[1], last[2] + rows)  # one slice again
                else:
                    segments.append((table, offset, rows))
        tables = [t.slice(o, n) for t, o, n in segments]
        rows_in = _one_batch(
            tables[0] if len(tables) == 1 else pa.concat_tables(tables), self.schema
        )
        (outcome,) = self.process([rows_in])
        lost = np.zeros(rows_in.num_rows, dtype=bool)
        lost[outcome.failed] = True
        counts: list[int] = []
        lasts: list[int] = []
        delivered: list[np.ndarray] = []
        start = 0
        for batch in group:
            mine = lost[start : start + len(batch.local)]
            start += len(batch.local)
            self._failed.add(np.sort(batch.local[mine]))
            if mine.all():
                continue  # the next batch's span takes these in
            counts.append(int(len(mine) - mine.sum()))
            lasts.append(int(batch.ordinals[-1]))
            delivered.append(batch.local[~mine])
        batches, filtered, failed = self._spanned(counts, lasts)
        result = outcome.result
        if not batches or result is None:
            return None
        assert result.num_rows == sum(rows for rows, _ in batches)
        self._row_bytes = max(1, result.nbytes // max(1, result.num_rows))
        seq = self.plan.to_global(self.partition, np.concatenate(delivered))
        return Message(result, batches, seq, filtered, failed)

    def _sliced(self, cut: list[_Batch]) -> list[Message]:
        """Batches of kept rows as they are, several to a message.

        Slices of one table that follow each other share a message, sent as one slice (no
        copy); a batch straddling two tables is copied, in a message of its own.
        """
        messages: list[Message] = []
        group: list[_Batch] = []

        def flush() -> None:
            if not group:
                return
            if len(group[0].segments) == 1:
                table, offset, _ = group[0].segments[0]
                rows = table.slice(offset, sum(len(b.local) for b in group))
            else:
                rows = group[0].table()
            batches, filtered, failed = self._spanned(
                [len(b.local) for b in group], [int(b.ordinals[-1]) for b in group]
            )
            seq = self.plan.to_global(self.partition, np.concatenate([b.local for b in group]))
            batch = _one_batch(rows, self.schema)
            messages.append(Message(batch, batches, seq, filtered, failed))
            group.clear()

        for batch in cut:
            if len(batch.segments) > 1:  # straddles two tables: copied, alone
                flush()
                group.append(batch)
                flush()
                continue
            if group:
                table, offset, rows = group[-1].segments[0]
                following = batch.segments[0][0] is table and batch.segments[0][1] == offset + rows
                if not following or len(group) >= MAX_CHUNKS:
                    flush()
            group.append(batch)
        flush()
        return messages

    def _finish(self) -> None:
        """What no batch spans (samples dropped at the very end) leaves the stream."""
        if not len(self._consumed):
            return
        tail = runs(np.sort(self._consumed))
        assert tail is not None
        filtered, failed = self._dropped_in(tail)
        self.work.release(tail, len(filtered), len(failed))
        self._consumed = np.zeros(0, dtype=np.int64)
        self._offset = self._next

    def _claim_cap(self) -> int:
        """The chunks a claim may ask for: ``max_chunks`` of kept rows, at most 8 times as many.

        A claim's samples should fill about as many batches whatever the filters drop: a
        filter that keeps half claims twice the chunks (half the catalog transactions and
        per-claim work of fixed size). The read-ahead window caps a claim still.
        """
        if not self._kept:
            return self.max_chunks
        return max(1, int(self.max_chunks * min(MAX_CLAIM_SCALE, self._next / self._kept)))

    def __iter__(self) -> Iterator[Message]:
        hold = self.blocks.hold_read_ahead()
        try:
            yield from self._messages()
        finally:
            hold.release()

    def _messages(self) -> Iterator[Message]:
        batch_size = self.plan.batch_size
        last = last_owned(self.plan, self.world)
        span = self.first_chunks  # small first claims: the first batch comes soon
        while True:
            units = self.work.claim(max(1, span))  # capped by the room once there is room
            span = min(span * 2, self._claim_cap())
            if units:
                self._final = self._final or _holds(units, last)
                self._take_in(units)
            pending = self._pending
            if not units and pending and self.plan.drop_last:
                for carried in self._carried:  # the partial batch is dropped: filtered
                    self._filtered.add(np.sort(carried.local))
                self._carried = []
                self._finish()
                return
            if units and pending < batch_size:
                continue
            if not pending:
                if not units:
                    self._finish()
                    return
                continue
            messages = self._cut(final=not units)
            if messages and self._final:
                messages[-1:] = list(_with_final_batch(messages[-1]))
            yield from messages
            if not units and not self._pending:
                self._finish()
                return
