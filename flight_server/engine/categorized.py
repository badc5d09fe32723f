"""``CategorizedBatcher``: batches that each hold samples of one category.

The stream reads its claims as any stream does (what the filters leave), and asks the iteration's
categorizer (vectorized, once per read) for each kept sample's category. Samples wait in a
bucket of their category; a bucket that reaches ``batch_size`` becomes a batch, collated
and preprocessed as usual. At the end of the stream each bucket left gives one partial
batch (none with ``drop_last``: their samples count as filtered), so a stream makes at
most one partial batch per category.

The batches come out in the order their buckets filled (the arrival of their last sample),
so they depend only on the order of the samples the stream reads, not on how much it
claims at a time: the same seed gives the same batches.

What a loop acknowledges (a batch's *span*) is the batch's own samples, which are not
contiguous any more, plus the samples dropped (filtered, failed) since the batch before:
so every claimed sample is spanned once, and a span is up to a batch's worth of small
ranges (the cost: longer ack messages and progress ranges that fill in out of order, never
more fragmented than the samples waiting in the buckets).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ...protocol.ranges import RangeSet, as_array, runs
from .batching import MAX_CHUNKS, Message, Process, Work
from .blocks import BlockReader
from .plan import EpochPlan
from .samples import SampleSet
from .state import Unit
from .world import World

__all__ = ["Categorize", "CategorizedBatcher"]

Categorize = Callable[[pa.RecordBatch], tuple[pa.Array, np.ndarray]]
"""``(categories, failed)`` of a batch's rows (in a worker process or here)."""

Ranges = list[tuple[int, int]]


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else table.schema.empty_table().to_batches()[0]


@dataclass
class _Bucket:
    """Samples of one category waiting for a batch: rows, local seqs, arrival ordinals."""

    tables: list[pa.Table] = field(default_factory=list)
    local: list[np.ndarray] = field(default_factory=list)
    ordinals: list[np.ndarray] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(a) for a in self.local)

    def take(self, count: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """The first ``count`` samples (all when ``count`` is larger)."""
        table = pa.concat_tables(self.tables)
        local, ordinals = np.concatenate(self.local), np.concatenate(self.ordinals)
        self.tables, self.local, self.ordinals = [table.slice(count)], [local[count:]],\
            [ordinals[count:]]  # fmt: skip
        return table.slice(0, count), local[:count], ordinals[:count]


class CategorizedBatcher:
    """Batches of one category each (see the module docstring).

    Otherwise ``TransformedBatcher``'s contract: the same ``Work``, the rows the filters
    leave (``blocks.kept``) and process.
    """

    def __init__(
        self,
        plan: EpochPlan,
        blocks: BlockReader,
        world: World,
        work: Work,
        categorize: Categorize,
        process: Process,
        schema: pa.Schema,
        first_chunks: int = 1,
        max_chunks: int = MAX_CHUNKS,
    ) -> None:
        self.plan = plan
        self.blocks = blocks
        self.world = world
        self.work = work
        self.categorize = categorize
        self.process = process
        self.schema = schema
        self.first_chunks = first_chunks
        self.max_chunks = max_chunks
        self._buckets: dict[int, _Bucket] = {}
        self._ids: dict[Hashable, int] = {}
        self._next = 0
        self._filtered = RangeSet()
        """Dropped samples no batch spans yet (they go with the next batch)."""
        self._failed = RangeSet()

    # -- taking work in ------------------------------------------------------------------

    @staticmethod
    def _drop(local: np.ndarray, into: RangeSet) -> None:
        if len(local):
            found = runs(np.sort(local))
            assert found is not None
            into.update(found)

    def _codes(self, values: pa.Array) -> np.ndarray:
        """Stable bucket ids of category values (the same value: the same id, always)."""
        if pa.types.is_null(values.type):
            return np.full(len(values), self._ids.setdefault(None, len(self._ids)), np.int64)
        encoded = values.dictionary_encode()
        lookup = [self._ids.setdefault(v, len(self._ids)) for v in encoded.dictionary.to_pylist()]
        lookup.append(self._ids.setdefault(None, len(self._ids)) if encoded.null_count else -1)
        indices = encoded.indices.fill_null(len(lookup) - 1).to_numpy(zero_copy_only=False)
        return np.asarray(lookup, dtype=np.int64)[indices]

    def _take_in(self, units: list[Unit]) -> None:
        local = as_array([r for unit in units for r in unit])
        ordinals = np.arange(self._next, self._next + len(local), dtype=np.int64)
        self._next += len(local)
        # what the iteration's filters leave (filtered once per block, on the read threads)
        seq = self.plan.to_global(self.world.partition, local)
        found = self.blocks.kept(self.plan, seq, self.work.check)
        self._drop(local[found.failed], self._failed)
        self._drop(local[~found.kept & ~found.failed], self._filtered)
        table, local, ordinals = found.table, local[found.kept], ordinals[found.kept]
        if not table.num_rows:
            return
        values, failed = self.categorize(_one_batch(table))
        if failed.any():
            self._drop(local[failed], self._failed)
            table, local = table.filter(pa.array(~failed)), local[~failed]
            ordinals, values = ordinals[~failed], values.filter(pa.array(~failed))
        codes = self._codes(values)
        for code in np.unique(codes).tolist():
            mask = codes == code
            bucket = self._buckets.setdefault(code, _Bucket())
            bucket.tables.append(table.filter(pa.array(mask)))
            bucket.local.append(local[mask])
            bucket.ordinals.append(ordinals[mask])

    # -- batches out ---------------------------------------------------------------------

    def _ready(self, final: bool) -> list[tuple[int, pa.Table, np.ndarray]]:
        """Batches to make now, in the order they filled: ``(fill ordinal, rows, local)``."""
        size = self.plan.batch_size
        found: list[tuple[int, pa.Table, np.ndarray]] = []
        for bucket in self._buckets.values():
            while bucket.size >= size or (final and bucket.size):
                table, local, ordinals = bucket.take(size)
                found.append((int(ordinals[-1]), table, local))
        found.sort(key=lambda item: item[0])
        return found

    def _take_dropped(self) -> tuple[RangeSet, RangeSet]:
        dropped = (self._filtered, self._failed)
        self._filtered, self._failed = RangeSet(), RangeSet()
        return dropped

    def _message(self, ready: list[tuple[int, pa.Table, np.ndarray]]) -> Message | None:
        """The batches ready, processed; each spans its samples and what was dropped before."""
        inputs = [_one_batch(table) for _, table, _ in ready]
        pieces: list[pa.RecordBatch] = []
        batches: list[tuple[int, Ranges]] = []
        delivered: list[np.ndarray] = []
        filtered, failed = RangeSet(), RangeSet()
        for (_, _, local), outcome in zip(ready, self.process(inputs), strict=True):
            lost = np.zeros(len(local), dtype=bool)
            lost[outcome.failed] = True
            if outcome.result is None or (lost.all() and not outcome.result.num_rows):
                self._drop(local, self._failed)  # the next batch spans them
                continue
            self._drop(local[lost], failed)
            before_filtered, before_failed = self._take_dropped()
            filtered.update(before_filtered.ranges())
            failed.update(before_failed.ranges())
            span = RangeSet(runs(np.sort(local)) or [])
            span.update(before_filtered.ranges())
            span.update(before_failed.ranges())
            result = outcome.result
            if pieces and not result.schema.equals(pieces[0].schema):
                result = result.cast(pieces[0].schema)
            pieces.append(result)
            batches.append((result.num_rows, span.ranges()))
            delivered.append(local[~lost])
        if not pieces:
            return None
        seq = self.plan.to_global(self.world.partition, np.sort(np.concatenate(delivered)))
        table = pa.Table.from_batches(pieces)
        return Message(
            _one_batch(table),
            batches,
            seq,
            SampleSet.of_ranges(filtered.ranges()),
            SampleSet.of_ranges(failed.ranges()),
        )

    def _finish(self) -> None:
        """Dropped samples no batch spans leave the stream (finished, counted)."""
        filtered, failed = self._take_dropped()
        ranges = RangeSet(filtered.ranges())
        ranges.update(failed.ranges())
        if ranges:
            self.work.release(ranges.ranges(), len(filtered), len(failed))

    def __iter__(self) -> Iterator[Message]:
        batch_size = self.plan.batch_size
        span = self.first_chunks
        while True:
            units = self.work.claim(max(1, min(span, self.work.room() // batch_size)))
            span = min(span * 2, self.max_chunks)
            if units:
                self._take_in(units)
                ready = self._ready(final=False)
                if ready:
                    message = self._message(ready)
                    if message is not None:
                        yield message
                continue
            if self.plan.drop_last:  # partial buckets are dropped: filtered
                for bucket in self._buckets.values():
                    for local in bucket.local:
                        self._drop(local, self._filtered)
                self._buckets.clear()
            ready = self._ready(final=True)
            if ready:
                message = self._message(ready)
                if message is not None:
                    yield message
            self._finish()
            return
