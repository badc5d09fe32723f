"""Batching: the messages of one stream, from the work it claims to the batches it sends.

Two batchers share one contract (``Work``: claim work within the read-ahead budget, release
samples no batch will span). ``PlainBatcher`` sends rows as read: its batches are the
chunks claimed. ``TransformedBatcher`` filters, then packs the samples that stay into full
batches and collates/preprocesses them; its batches *span* the samples dropped on their
way, so that what a loop acknowledges stays a few contiguous ranges.

Several batches travel in one Flight message (about ``MESSAGE_BYTES``): per-message costs
are paid once for many small batches. The first message holds one batch, so the first
batch arrives as soon as possible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa

from ...protocol.ranges import RangeSet, as_array, runs
from ...transforms import Outcome
from .blocks import BlockReader
from .plan import EpochPlan
from .state import Unit
from .world import World

__all__ = ["MESSAGE_BYTES", "Message", "PlainBatcher", "TransformedBatcher", "Work"]

MESSAGE_BYTES = 4 << 20
MESSAGE_ROWS = 1 << 16
MAX_CHUNKS = 512

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


@dataclass
class Message:
    """One Flight message: the rows of consecutive batches, and what they carry.

    ``batches``: each batch's row count and the local sequence ranges it spans (what the
    loop acknowledges). ``seq``: the global sequence numbers of the rows, in order.
    ``filtered``/``failed``: samples dropped inside those spans (counted when the spanning
    batch is completed).
    """

    batch: pa.RecordBatch
    batches: list[tuple[int, Ranges]]
    seq: np.ndarray
    filtered: RangeSet = field(default_factory=RangeSet)
    failed: RangeSet = field(default_factory=RangeSet)

    @property
    def samples(self) -> int:
        """Samples the message's batches span."""
        return sum(b - a for _, ranges in self.batches for a, b in ranges)


def _one_batch(table: pa.Table, schema: pa.Schema) -> pa.RecordBatch:
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


class PlainBatcher:
    """Rows as read: each claimed chunk is one batch.

    Rows of unreadable shards that are skipped leave the batches and are released as failed.
    """

    def __init__(
        self,
        plan: EpochPlan,
        blocks: BlockReader,
        world: World,
        work: Work,
        schema: pa.Schema,
    ) -> None:
        self.plan = plan
        self.blocks = blocks
        self.world = world
        self.work = work
        self.schema = schema

    def __iter__(self) -> Iterator[Message]:
        batch_size = self.plan.batch_size
        chunks = 1
        while True:
            units = self.work.claim(max(1, min(chunks, self.work.room() // batch_size)))
            if not units:
                return
            local = as_array([r for unit in units for r in unit])
            seq = self.plan.to_global(self.world.partition, local)
            rows = self.blocks.rows(self.plan, seq)  # a left join: no sample is left out
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
            yield message
            chunks = _message_chunks(message.batch, batch_size)


def _without(batches: list[tuple[int, Ranges]], kept: np.ndarray) -> list[tuple[int, Ranges]]:
    """Batch descriptions keeping only the sequence numbers in ``kept`` (dropping empties)."""
    keep = set(kept.tolist())
    result = []
    for _, unit in batches:
        values = [v for a, b in unit for v in range(a, b) if v in keep]
        if values:
            found = runs(np.array(values, dtype=np.int64))
            assert found is not None
            result.append((len(values), found))
    return result


Process = Callable[[list[pa.RecordBatch]], list[Outcome]]
"""Collate and preprocess batches (in worker processes or here), in order."""

Filter = Callable[[pa.RecordBatch], tuple[np.ndarray, np.ndarray]]
"""``(keep, failed)`` masks of a batch's rows (in a worker process or here)."""


class TransformedBatcher:
    """Filtered, collated or preprocessed batches.

    Invariant: every sample the stream claimed is either spanned by a batch already sent,
    or *consumed* and not yet spanned (``_consumed``, in claim order; the first has ordinal
    ``_offset``). Of the consumed ones, those that stay wait in ``_carried`` (rows, their
    local sequence numbers and ordinals) to fill a batch; the others were dropped and are
    listed in ``_filtered``/``_failed``. A batch spans every consumed sample up to its last
    row, so the spans a loop acknowledges cover every claimed sample exactly once.
    """

    def __init__(
        self,
        plan: EpochPlan,
        blocks: BlockReader,
        world: World,
        work: Work,
        filter: Filter,
        process: Process,
        schema: pa.Schema,
        first_chunks: int = 1,
        max_chunks: int = MAX_CHUNKS,
    ) -> None:
        self.plan = plan
        self.blocks = blocks
        self.world = world
        self.work = work
        self.filter = filter
        self.process = process
        self.schema = schema
        self.first_chunks = first_chunks
        self.max_chunks = max_chunks
        self._consumed = np.zeros(0, dtype=np.int64)
        self._offset = 0
        self._next = 0
        self._carried: list[pa.Table] = []
        self._carried_local: list[np.ndarray] = []
        self._carried_ord: list[np.ndarray] = []
        self._filtered = RangeSet()
        self._failed = RangeSet()

    # -- taking work in ------------------------------------------------------------------

    def _take_in(self, units: list[Unit]) -> None:
        local = as_array([r for unit in units for r in unit])
        ordinals = np.arange(self._next, self._next + len(local), dtype=np.int64)
        self._next += len(local)
        self._consumed = np.concatenate([self._consumed, local])
        rows = self.blocks.rows(self.plan, self.plan.to_global(self.world.partition, local))
        keep = np.ones(len(local), dtype=bool)
        if rows.unreadable is not None:
            self._drop(local[rows.unreadable], self._failed)
            keep &= ~rows.unreadable
        if rows.absent is not None:  # an inner join leaves them out: they count as filtered
            self._drop(local[rows.absent & keep], self._filtered)
            keep &= ~rows.absent
        table = rows.table if keep.all() else rows.table.filter(pa.array(keep))
        local, ordinals = local[keep], ordinals[keep]
        if not table.num_rows:
            return
        kept, failed = self.filter(_one_batch(table, self.schema))
        self._drop(local[~kept & ~failed], self._filtered)
        self._drop(local[failed], self._failed)
        self._carried.append(table.filter(pa.array(kept)))
        self._carried_local.append(local[kept])
        self._carried_ord.append(ordinals[kept])

    @staticmethod
    def _drop(local: np.ndarray, into: RangeSet) -> None:
        if len(local):
            found = runs(np.sort(local))
            assert found is not None
            into.update(found)

    @property
    def _pending(self) -> int:
        return sum(len(s) for s in self._carried_local)

    # -- batches out ---------------------------------------------------------------------

    def _span(self, last_ordinal: int) -> Ranges:
        """Every consumed sample up to ``last_ordinal`` that no batch spans yet."""
        cut = last_ordinal + 1 - self._offset
        span, self._consumed = self._consumed[:cut], self._consumed[cut:]
        self._offset = last_ordinal + 1
        found = runs(np.sort(span))
        assert found is not None
        return found

    def _dropped_in(self, span: Ranges) -> tuple[RangeSet, RangeSet]:
        """The dropped samples inside a span, taken out of the waiting lists."""
        found = (RangeSet(), RangeSet())
        for source, target in zip((self._filtered, self._failed), found, strict=True):
            for a, b in span:
                for x, y in source.intersection(a, b):
                    target.add(x, y)
                    source.remove(x, y)
        return found

    def _cut(self, final: bool) -> Message | None:
        """Full batches of the carried rows (at the end, the partial one too), processed."""
        batch_size = self.plan.batch_size
        rows = pa.concat_tables(self._carried).combine_chunks()
        local = np.concatenate(self._carried_local)
        ordinals = np.concatenate(self._carried_ord)
        full = len(local) if final else len(local) // batch_size * batch_size
        inputs = [
            _one_batch(rows.slice(s, batch_size), rows.schema) for s in range(0, full, batch_size)
        ]
        self._carried, self._carried_local = [rows.slice(full)], [local[full:]]
        self._carried_ord = [ordinals[full:]]
        pieces: list[pa.RecordBatch] = []
        batches: list[tuple[int, Ranges]] = []
        delivered: list[np.ndarray] = []
        filtered, failed = RangeSet(), RangeSet()
        for index, outcome in enumerate(self.process(inputs)):
            part = slice(index * batch_size, index * batch_size + inputs[index].num_rows)
            batch_local, batch_ord = local[part], ordinals[part]
            lost = np.zeros(len(batch_local), dtype=bool)
            lost[outcome.failed] = True
            self._drop(batch_local[lost], self._failed)
            if outcome.result is None or (lost.all() and not outcome.result.num_rows):
                continue  # the next batch's span takes these in
            span = self._span(int(batch_ord[-1]))
            inside = self._dropped_in(span)
            filtered.update(inside[0].ranges())
            failed.update(inside[1].ranges())
            result = outcome.result
            if pieces and not result.schema.equals(pieces[0].schema):
                result = result.cast(pieces[0].schema)
            pieces.append(result)
            batches.append((result.num_rows, span))
            delivered.append(batch_local[~lost])
        if not pieces:
            return None
        seq = self.plan.to_global(self.world.partition, np.sort(np.concatenate(delivered)))
        table = pa.Table.from_batches(pieces)
        return Message(_one_batch(table, pieces[0].schema), batches, seq, filtered, failed)

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

    def __iter__(self) -> Iterator[Message]:
        batch_size = self.plan.batch_size
        span = self.first_chunks  # small first claims: the first batch comes soon
        while True:
            units = self.work.claim(max(1, min(span, self.work.room() // batch_size)))
            span = min(span * 2, self.max_chunks)
            if units:
                self._take_in(units)
            pending = self._pending
            if not units and pending and self.plan.drop_last:
                for local in self._carried_local:  # the partial batch is dropped: filtered
                    self._drop(local, self._filtered)
                self._carried, self._carried_local, self._carried_ord = [], [], []
                self._finish()
                return
            if units and pending < batch_size:
                continue
            if not pending:
                if not units:
                    self._finish()
                    return
                continue
            message = self._cut(final=not units)
            if message is not None:
                yield message
            if not units and not self._pending:
                self._finish()
                return
