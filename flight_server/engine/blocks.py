"""Block reads: the rows of an epoch's blocks, read once and shared by every rank's stream.

A block is the shards an epoch reads (and shuffles) together (``plan.Block``). Its rows are
read on the read threads, the next block while the current one streams, and kept for the
streams of every rank (ranks a block apart share the read instead of each reading every
shard). ``rows(plan, seq)`` answers the rows of any ascending global sequence numbers.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ...protocol.errors import LavenderError, SchemaMismatch
from ..reading import DatasetReader
from .plan import EpochPlan

__all__ = ["BlockReader", "Rows"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rows:
    """Rows of an iteration, and which of them to leave out (each mask None when none).

    ``unreadable``: rows of shards that could not be read and were skipped (they count as
    failed); ``absent``: rows an inner join leaves out (they count as filtered).
    """

    table: pa.Table
    unreadable: np.ndarray | None = None
    absent: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        """Rows, left-out ones included."""
        return self.table.num_rows

    def take(self, rows: np.ndarray, contiguous: bool) -> Rows:
        """The given rows (a zero-copy slice when they run in order)."""
        if contiguous and len(rows):
            table = self.table.slice(int(rows[0]), len(rows))
        else:
            table = self.table.take(pa.array(rows))
        return Rows(
            table,
            None if self.unreadable is None else self.unreadable[rows],
            None if self.absent is None else self.absent[rows],
        )

    @staticmethod
    def concat(pieces: list[Rows]) -> Rows:
        """Pieces laid end to end."""
        if len(pieces) == 1:
            return pieces[0]
        sizes = [p.num_rows for p in pieces]
        return Rows(
            pa.concat_tables([p.table for p in pieces]),
            joined_masks([p.unreadable for p in pieces], sizes),
            joined_masks([p.absent for p in pieces], sizes),
        )


def joined_masks(masks: list[np.ndarray | None], sizes: list[int]) -> np.ndarray | None:
    """Row masks of pieces laid end to end (None for a piece with no row set, or for all)."""
    if all(mask is None or not mask.any() for mask in masks):
        return None
    return np.concatenate(
        [np.zeros(n, dtype=bool) if m is None else m for m, n in zip(masks, sizes, strict=True)]
    )


class BlockReader:
    """Reads an iteration's blocks (a few kept, shared by its streams) and cuts rows from them.

    Args:
        reader: the iteration's dataset reader (its shardsets, columns and join).
        shards: ``(shard index, rows)`` of the main shards the iteration froze.
        retries: how many more times an unreadable shard is tried.
        skip: whether a shard that stays unreadable is skipped (its rows fail) or raises.
        blocks: the threads that assemble blocks; ``shard_reads``: the threads that read
            shards (several per block, side by side).
        capacity: blocks kept (the current one of each stream and the next).
        iteration_id: for messages.
    """

    def __init__(
        self,
        reader: DatasetReader,
        shards: list[tuple[int, int]],
        retries: int,
        skip: bool,
        blocks: ThreadPoolExecutor,
        shard_reads: ThreadPoolExecutor,
        capacity: int = 3,
        iteration_id: str = "",
    ) -> None:
        self.reader = reader
        self.shards = shards
        self.retries = retries
        self.skip = skip
        self._blocks = blocks
        self._shard_reads = shard_reads
        self._capacity = capacity
        self._iteration_id = iteration_id
        self._cache: OrderedDict[tuple[int, int], Future[Rows]] = OrderedDict()
        self._lock = threading.Lock()

    # -- one shard -----------------------------------------------------------------------

    def _read_shard(self, slot: int) -> tuple[pa.Table, np.ndarray | None] | None:
        """A main shard's joined rows, and those an inner join leaves out.

        See ``DatasetReader.read_joined``; None when it cannot be read and failures are
        skipped.
        """
        index, rows = self.shards[slot]
        error: Exception | None = None
        for _ in range(self.retries + 1):
            try:
                table, missing = self.reader.read_joined(self.reader.main_shard(index))
            except (LavenderError, OSError, pa.ArrowException) as exc:
                error = exc
                continue
            if table.num_rows != rows:
                error = SchemaMismatch(
                    f"shard {index} of the main shardset has {table.num_rows} rows, "
                    f"{rows} when iteration {self._iteration_id} started: it was rewritten"
                )
                continue
            return table, missing
        assert error is not None
        if not self.skip:
            raise error
        log.warning("iteration %s: skipping unreadable shard %d (%d samples): %s",
                    self._iteration_id, index, rows, error)  # fmt: skip
        return None

    # -- blocks --------------------------------------------------------------------------

    def _load(self, plan: EpochPlan, number: int) -> Rows:
        """A block's rows laid end to end (one chunk when shuffled: ``take`` is fast there)."""
        block = plan.blocks[number]
        reads = [self._shard_reads.submit(self._read_shard, s) for s in block.shard_slots]
        schema = self.reader.schema
        pieces: list[Rows] = []
        for slot, read in zip(block.shard_slots, reads, strict=True):
            result = read.result()
            if result is None:  # unreadable and skipped: placeholder rows, marked failed
                rows = self.shards[slot][1]
                table = pa.table({f.name: pa.nulls(rows, f.type) for f in schema}, schema=schema)
                pieces.append(Rows(table, np.ones(rows, dtype=bool), None))
            else:
                pieces.append(Rows(result[0], None, result[1]))
        if not pieces:
            return Rows(schema.empty_table())
        joined = Rows.concat(pieces)
        if plan.shuffle:  # random access (take) is fast on one chunk; plain slices need no copy
            joined = Rows(joined.table.combine_chunks(), joined.unreadable, joined.absent)
        return joined

    def _future(self, plan: EpochPlan, number: int) -> Future[Rows]:
        key = (plan.epoch, number)
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                future = self._blocks.submit(self._load, plan, number)
                self._cache[key] = future
                while len(self._cache) > self._capacity:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            return future

    def block(self, plan: EpochPlan, number: int) -> Rows:
        """A block's rows (waits for its read; a failed read is tried again next time)."""
        future = self._future(plan, number)
        try:
            return future.result()
        except BaseException:
            with self._lock:
                if self._cache.get((plan.epoch, number)) is future:
                    del self._cache[(plan.epoch, number)]
            raise

    def prefetch(self, plan: EpochPlan, number: int) -> None:
        """Start reading a block the streams will need soon."""
        if number < len(plan.blocks):
            self._future(plan, number)

    def rows(self, plan: EpochPlan, seq: np.ndarray) -> Rows:
        """Rows for ascending global sequence numbers of an epoch, in that order."""
        pieces: list[Rows] = []
        for number, start, stop in plan.segments(seq):
            self.prefetch(plan, number + 1)  # read side by side with this one
            block = self.block(plan, number)
            rows = plan.rows_in_block(number, seq[start:stop])
            contiguous = not plan.shuffle and int(rows[-1]) - int(rows[0]) == len(rows) - 1
            pieces.append(block.take(rows, contiguous))
        if not pieces:
            return Rows(self.reader.schema.empty_table())
        return Rows.concat(pieces)

    def clear(self) -> None:
        """Drop every kept block."""
        with self._lock:
            self._cache.clear()
