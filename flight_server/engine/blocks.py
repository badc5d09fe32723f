"""Block reads: an epoch's blocks read once, put in the epoch's order, shared by every stream.

A block is the shards an epoch reads (and shuffles) together (``plan.Block``). It is read
on the server's read pool (``read_pool``): its shards side by side, each on its store's
lane (and decoded once for the whole server: ``reading.ShardCache``), then, on the ``cpu``
lane, put in the epoch's order: the block's permutation is drawn there while the shards are
read, and its rows gathered by ``take``, piece by piece (a small first piece of about
``FIRST_PIECE_ROWS``, then pieces ending at global sequence numbers that are multiples of
``PIECE_ROWS``), so that a first batch waits for a few thousand rows, not the whole block
(nor its whole permutation: the first piece takes the order's head, ``plan.BlockOrder``).
The first piece is gathered from the shards as read (``take_rows``); the shards are then
laid end to end once for the other pieces (Arrow's ``take`` would do it on every call).
An iteration with filters filters each piece there too, once for every rank, vectorized:
its kept rows laid end to end. Streams then cut messages as zero-copy slices
(``boundary`` says where a slice would cross pieces).

A few blocks are kept per iteration (the current one of each stream and the next); each
is reserved in the server's memory budget while kept. ``rows(plan, seq)`` answers the rows
of any ascending global sequence numbers, ``kept(plan, seq)`` what a filter leaves of them.
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...protocol.errors import LavenderError, SchemaMismatch
from ...protocol.ranges import runs
from ..memory import (
    MMAP_THRESHOLD,
    MemoryBudget,
    Reservation,
    heap_in_use_bytes,
    release_pool,
    resident_bytes,
    table_bytes,
)
from ..read_pool import CPU, ReadPool, wait_for
from ..reading import DatasetReader
from .plan import BlockOrder, EpochPlan

__all__ = ["FIRST_PIECE_ROWS", "PIECE_ROWS", "BlockReader", "Kept", "Rows", "take_rows"]

log = logging.getLogger(__name__)

PIECE_ROWS = 1 << 16
"""A gathered block's pieces (after the first) end at global sequence numbers that are
multiples of this (rounded up to the batch size)."""
FIRST_PIECE_ROWS = 1 << 12
"""A gathered block's first piece: about this many rows (to a batch boundary), what a
stream starting on the block waits for. Small: a random gather of 64k rows of 100 bytes
takes milliseconds, of 4k a tenth of one."""

RELEASE_IDLE_SECONDS = 2.0
"""Freed block memory goes back to the system once no block was started for this long
after the last streams of an iteration ended (``IdleRelease``)."""
KEEP_FRACTION = 4
"""At most this part of the memory budget (a quarter), and no more than the budget has room
for, is kept freed for the next blocks (``IdleRelease``): past it, it goes back at once.
An eighth was too little for one shuffled epoch of 100k rows of 4 KiB values on a 6 GB
budget: it leaves 807-889 MB freed, so every such epoch gave them back at its end and the
next one faulted them in again (side by side, 2026-12-04)."""

CHECK_SECONDS = 0.01
"""How often a stream waiting for a piece asks whether to stop (``BlockReader.rows``)."""

Filter = Callable[[pa.RecordBatch], tuple[np.ndarray, np.ndarray]]
"""``(keep, failed)`` masks of a batch's rows."""

ShardRead = tuple[pa.Table, np.ndarray | None] | None
"""A main shard's joined rows and the rows an inner join leaves out (None: skipped)."""


class Abandoned(Exception):
    """A block's gather stopped: every stream of its iteration ended (see ``clear``)."""


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
        """Pieces laid end to end (their chunks side by side: no copy)."""
        if len(pieces) == 1:
            return pieces[0]
        sizes = [p.num_rows for p in pieces]
        return Rows(
            pa.concat_tables([p.table for p in pieces]),
            joined_masks([p.unreadable for p in pieces], sizes),
            joined_masks([p.absent for p in pieces], sizes),
        )


@dataclass(frozen=True)
class Kept:
    """What a filtered iteration keeps of some samples: their rows, and the others' fate.

    ``table`` holds the kept samples' rows, in order; ``kept`` and ``failed`` say, per
    sample asked for, whether it stays or failed (unreadable shard, a filter raised on it);
    the others were filtered out (by a filter, or absent from an inner join). ``parts``
    says where the rows live: ``(table, offset, rows)`` slices laid end to end (a batcher
    joins the slices of one table that follow each other back into one, without a copy).
    """

    table: pa.Table
    kept: np.ndarray
    failed: np.ndarray
    parts: tuple[tuple[pa.Table, int, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.parts and self.table.num_rows:
            object.__setattr__(self, "parts", ((self.table, 0, self.table.num_rows),))

    @staticmethod
    def concat(pieces: list[Kept]) -> Kept:
        """Pieces laid end to end (their chunks side by side: no copy)."""
        if len(pieces) == 1:
            return pieces[0]
        return Kept(
            pa.concat_tables([p.table for p in pieces]),
            np.concatenate([p.kept for p in pieces]),
            np.concatenate([p.failed for p in pieces]),
            tuple(part for p in pieces for part in p.parts),
        )


@functools.cache
def block_pool() -> pa.MemoryPool:
    """The pool a shuffled block's large buffers come from (mimalloc's if there).

    Else jemalloc's, else the default; see ``pool_for`` for which buffers. mimalloc keeps
    the pages of a freed buffer for the next one (up to ``MIMALLOC_PURGE_DELAY_MS``, or
    until ``IdleRelease`` gives them back); glibc maps every buffer over its mmap
    threshold (32 MiB here) apart and unmaps it when freed, and jemalloc, as Arrow sets it
    up, gives a freed extent back at once too, so the kernel faulted each new block in page
    by page. Laying 4 shards of 4 KiB values end to end (a 164 MB column), 6 times, on an
    AMD EPYC VM whose page faults cost several us: glibc 143-164 ms, jemalloc 137-181,
    mimalloc 29-37 after the first; gathering them into one piece: 171-212, 163-176 and
    42-46 ms.
    """
    for make in (pa.mimalloc_memory_pool, pa.jemalloc_memory_pool):
        try:
            return make()
        except (NotImplementedError, pa.ArrowException):
            continue
    return pa.default_memory_pool()


class IdleRelease:
    """Gives the allocators' freed pages back to the system once blocks have been idle a while.

    A block's pieces are fresh buffers; the kernel faults each page in on first touch,
    which on a VM costs microseconds a page (45 MB: 25 ms, against 1.3 ms to write it once
    mapped). Freed, they stay with the allocator (glibc's heap up to ``tune_malloc``'s trim
    threshold, ``block_pool`` for the largest) for the next block, until this gives them
    back: ``RELEASE_IDLE_SECONDS`` after the last streams of an iteration ended, if no
    block was started since. Given back at once, as before, every new epoch (a new stream,
    often a new iteration) faulted its pieces in again: shuffled 1M-row text epochs, one
    after the other, cost the server 230-300 ms of CPU each, against 110-170 with the
    pages kept (AMD EPYC VM). What is kept is bounded (``later``'s ``keep``: a quarter of
    the memory budget, never more than its room), so busy or idle the server stays under
    its budget plus its fixed overhead.

    A release gives back glibc's free pages (``malloc_trim``) and every thread's in
    mimalloc's (``memory.release_pool``; pyarrow's own ``release_unused`` of the block pool
    gave back the default pool's, so mimalloc kept its pages until it purged them itself).
    """

    def __init__(self, delay: float = RELEASE_IDLE_SECONDS) -> None:
        self.delay = delay
        self._lock = threading.Lock()
        self._started = 0
        self._timer: threading.Timer | None = None
        self._since: tuple[int, int] | None = None
        """RSS and live allocated bytes after the last release (or the first look)."""

    def block_started(self) -> None:
        """A block is being read: pages freed before now are about to be reused."""
        with self._lock:
            self._started += 1

    def kept_bytes(self) -> int | None:
        """About how much freed memory the process keeps resident beyond the last release.

        Its RSS growth since then, less the growth of what its allocators have handed out
        and not been given back (None where either cannot be read).
        """
        now = _resident_and_live()
        if now is None:
            return None
        with self._lock:
            if self._since is None:
                self._since = now
            rss, live = self._since
        return (now[0] - rss) - (now[1] - live)

    def later(self, keep: int) -> None:
        """Give the freed pages back after ``delay``, unless a block starts before.

        At once when the process already keeps more than ``keep`` bytes freed
        (``kept_bytes``): blocks reuse what was freed only in part (their sizes differ
        from epoch to epoch, and so do the holes they leave), and iterations that followed
        each other with no pause kept adding to it (100 iterations of five kinds: +79-87 MB
        between the medians of the 11th-20th and the 91st-100th, kept without a bound).
        """
        kept = self.kept_bytes()
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if kept is None or kept <= keep:
                self._timer = threading.Timer(self.delay, self._release, (self._started,))
                self._timer.daemon = True
                self._timer.start()
                return
        self._release_now()

    def _release(self, seen: int) -> None:
        with self._lock:
            if self._started != seen:  # blocks started since: their iteration's end releases
                return
            self._timer = None
        self._release_now()

    def _release_now(self) -> None:
        release_unused()
        now = _resident_and_live()
        with self._lock:
            self._since = now


def _resident_and_live() -> tuple[int, int] | None:
    """The process's RSS and the bytes its allocators have handed out (glibc's, the pool's)."""
    rss, heap = resident_bytes(), heap_in_use_bytes()
    if rss is None or heap is None:
        return None
    live = heap
    pools = (pa.default_memory_pool(), block_pool())  # the default: a new wrapper each call
    for pool in {p.backend_name: p for p in pools}.values():
        if pool.backend_name != "system":  # glibc's malloc: counted in the heap already
            live += pool.bytes_allocated()
    return rss, live


def release_unused() -> None:
    """Give the pages the allocators keep for reuse back to the system (now)."""
    release_pool(pa.default_memory_pool())
    if block_pool().backend_name != pa.default_memory_pool().backend_name:
        release_pool(block_pool())


IDLE_RELEASE = IdleRelease()
"""The server's one ``IdleRelease`` (the allocators are the process's)."""


LARGE_BUFFER_BYTES = MMAP_THRESHOLD
"""A buffer over this size comes from ``block_pool()``, a smaller one from the default."""


def pool_for(column_bytes: int) -> pa.MemoryPool:
    """The pool for buffers of up to ``column_bytes`` (a column's size, say).

    Smaller buffers stay on the default pool (glibc's heap, set up by ``tune_malloc``),
    which reuses them without a fault and gives them back when idle: with every buffer of
    a block on mimalloc, the server's RSS grew 24-45 MiB over 100 small iterations (test
    ``test_a_hundred_iterations_leave_the_server_under_its_memory_budget``), against -3 to
    +8 MiB this way.
    """
    return block_pool() if column_bytes > LARGE_BUFFER_BYTES else pa.default_memory_pool()


def largest_column_bytes(table: pa.Table, rows: int | None = None) -> int:
    """The bytes of a table's largest column (scaled to ``rows`` of its rows, if given)."""
    largest = max((table_bytes(column) for column in table.columns), default=0)
    if rows is None or not table.num_rows:
        return largest
    return largest * rows // table.num_rows


def joined_masks(masks: list[np.ndarray | None], sizes: list[int]) -> np.ndarray | None:
    """Row masks of pieces laid end to end (None for a piece with no row set, or for all)."""
    if all(mask is None or not mask.any() for mask in masks):
        return None
    return np.concatenate(
        [np.zeros(n, dtype=bool) if m is None else m for m, n in zip(masks, sizes, strict=True)]
    )


def take_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table.take(rows)``, without laying a chunked table end to end first.

    Arrow's ``take`` of a chunked column concatenates its chunks on every call (a copy of
    the whole column, for however few rows). Here each chunk gives its own rows, and one
    more ``take`` of those few puts them in the asked order. Large columns land in
    ``block_pool()`` (``pool_for``).
    """
    pool = pool_for(largest_column_bytes(table, len(rows)))
    if not len(rows) or all(c.num_chunks <= 1 for c in table.columns):
        return pc.take(table, pa.array(rows), memory_pool=pool)
    batches = table.to_batches()  # one per run of rows where no column's chunk ends
    starts = np.cumsum([0, *(b.num_rows for b in batches)])
    which = np.searchsorted(starts, rows, side="right") - 1
    order = np.argsort(which, kind="stable")
    cuts = np.searchsorted(which[order], np.arange(len(batches) + 1))
    parts = [
        pc.take(batch, pa.array(rows[order[a:b]] - starts[number]), memory_pool=pool)
        for number, (batch, a, b) in enumerate(zip(batches, cuts[:-1], cuts[1:], strict=True))
        if b > a
    ]
    grouped = pa.Table.from_batches(parts, schema=table.schema).combine_chunks(memory_pool=pool)
    back = np.empty(len(rows), dtype=np.int64)
    back[order] = np.arange(len(rows), dtype=np.int64)
    return pc.take(grouped, pa.array(back), memory_pool=pool)


RUN_ROWS = 64
"""Rows in order whose runs are this long on average are cut as slices, not taken."""


def _cut(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """Rows of a table: zero-copy slices when they run in order, else one ``take``.

    One run is one slice. Several long runs (a worker's share of a rank, a rank's of an
    epoch: every other batch) are slices laid end to end: the message they go into is the
    one copy of their rows (a ``take`` here and that message made two).
    """
    if not len(rows):
        return table.slice(0, 0)
    first, last = int(rows[0]), int(rows[-1])
    if last - first == len(rows) - 1:
        return table.slice(first, len(rows))
    found = runs(rows, limit=len(rows) // RUN_ROWS) if len(rows) >= 2 * RUN_ROWS else None
    if found is not None:  # laid end to end in the asked order, whatever order the runs are
        return pa.concat_tables([table.slice(a, b - a) for a, b in found])
    return take_rows(table, rows)


@dataclass
class _Piece:
    """Consecutive rows of a block in the epoch's order: block positions ``[start, stop)``."""

    start: int
    stop: int
    table: pa.Table
    unreadable: np.ndarray | None = None
    absent: np.ndarray | None = None
    # what the iteration's filters leave (None without filters)
    keep: np.ndarray | None = None
    failed: np.ndarray | None = None
    kept_rows: np.ndarray | None = None
    """The positions of the kept rows, ascending: row ``i`` of ``kept_table`` is
    ``kept_rows[i]`` of ``table``."""
    kept_table: pa.Table | None = None

    def rows(self, local: np.ndarray) -> Rows:
        return Rows(
            _cut(self.table, local),
            None if self.unreadable is None else self.unreadable[local],
            None if self.absent is None else self.absent[local],
        )

    def kept(self, local: np.ndarray) -> Kept:
        assert self.keep is not None and self.failed is not None
        assert self.kept_table is not None and self.kept_rows is not None
        if len(local) and int(local[-1]) - int(local[0]) == len(local) - 1:
            # a run of rows (ascending): slices, and its kept rows are one slice too
            a, b = int(local[0]), int(local[-1]) + 1
            first, stop = np.searchsorted(self.kept_rows, (a, b)).tolist()
            count = stop - first
            parts = ((self.kept_table, first, count),) if count else ()
            return Kept(
                self.kept_table.slice(first, count), self.keep[a:b], self.failed[a:b], parts
            )
        keep = self.keep[local]
        rows = np.searchsorted(self.kept_rows, local[np.flatnonzero(keep)])
        table = _cut(self.kept_table, rows)
        if len(rows) and int(rows[-1]) - int(rows[0]) == len(rows) - 1:
            return Kept(
                table, keep, self.failed[local], ((self.kept_table, int(rows[0]), len(rows)),)
            )
        return Kept(table, keep, self.failed[local])

    @property
    def nbytes(self) -> int:
        """The bytes the piece holds: its rows and the kept ones, a buffer counted once.

        (Kept rows in long runs are slices of the piece's rows, not a copy of them.)
        """
        if self.kept_table is None:
            return table_bytes(self.table)
        return table_bytes(pa.concat_tables([self.table, self.kept_table]))


@dataclass
class _Block:
    """One block being read or read: its pieces (each a future) and what it reserves."""

    number: int
    start: int
    bounds: list[int]
    """Block positions where pieces start, and the block's size last."""
    pieces: list[Future[_Piece]]
    reservation: Reservation | None = None
    dropped: bool = False
    abandoned: bool = False
    """No stream will read it (they all ended): its gather stops at the next piece."""
    urgent: bool = False
    """A stream (or a new iteration's first batch) waits for it: its tasks go first."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def piece_of(self, position: int) -> int:
        return bisect.bisect_right(self.bounds, position) - 1

    def hold(self, reservation: Reservation) -> None:
        """Keep ``reservation`` until the block is dropped (at once if it already was)."""
        with self.lock:
            if self.reservation is not None:
                self.reservation.release()
            self.reservation = reservation
            if self.dropped:
                reservation.release()

    def release(self) -> None:
        """The block is dropped: what it reserved goes back to the budget."""
        with self.lock:
            self.dropped = True
            if self.reservation is not None:
                self.reservation.release()
                self.reservation = None


class BlockReader:
    """Reads an iteration's blocks (a few kept, shared by its streams) and cuts rows from them.

    Args:
        reader: the iteration's dataset reader (its shardsets, columns and join).
        shards: ``(shard index, rows)`` of the main shards the iteration froze.
        retries: how many more times an unreadable shard is tried.
        skip: whether a shard that stays unreadable is skipped (its rows fail) or raises.
        pool: the server's read pool (shards on their store's lane, gathers on ``cpu``).
        memory: the server's memory budget (kept blocks and read-ahead are reserved in it).
        capacity: blocks kept (the current one of each stream and up to two after it).
        iteration_id: for messages.
        filter: the iteration's filters (``kept`` answers what they leave), if any.
        read_ahead_bytes: what one stream may hold ahead of its loop (``hold_read_ahead``).
    """

    def __init__(
        self,
        reader: DatasetReader,
        shards: list[tuple[int, int]],
        retries: int,
        skip: bool,
        pool: ReadPool,
        memory: MemoryBudget | None = None,
        capacity: int = 4,
        iteration_id: str = "",
        filter: Filter | None = None,
        read_ahead_bytes: int = 0,
    ) -> None:
        self.reader = reader
        self.shards = shards
        self.retries = retries
        self.skip = skip
        self.pool = pool
        self.memory = memory if memory is not None else reader.cache.budget
        self._capacity = capacity
        self._iteration_id = iteration_id
        self.filter = filter
        self.read_ahead_bytes = read_ahead_bytes
        self._cache: OrderedDict[tuple[int, int], _Block] = OrderedDict()
        self._lock = threading.Lock()

    # -- one shard -----------------------------------------------------------------------

    def _read_shard(self, slot: int) -> ShardRead:
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

    def _read_for(self, state: _Block, slot: int) -> ShardRead:
        """``_read_shard`` for a block's read, not begun once nobody reads the block.

        An iteration whose last stream ended soon after its first batch had the shards of
        the blocks it read ahead still queued: their decoding slowed the next iteration's
        first batch.
        """
        self._go_on(state)
        return self._read_shard(slot)

    def _read_on(self, lane: str, state: _Block, slot: int, urgent: bool) -> Future[ShardRead]:
        """A block's read of one shard: done at once when its files are decoded already.

        Otherwise it runs on the store's lane. A decoded shard used to queue there behind
        other iterations' reads: a new iteration's first block, all of it decoded, waited
        20-40 ms for the shards the last iteration read ahead (traced).
        """
        index, rows = self.shards[slot]
        try:
            found = self.reader.read_decoded(self.reader.main_shard(index))
        except LavenderError:
            found = None  # the lane's read says what is wrong (and retries)
        if found is None or found[0].num_rows != rows:
            return self.pool.submit(lane, self._read_for, state, slot, urgent=urgent, tag=state)
        done: Future[ShardRead] = Future()
        done.set_result(found)
        return done

    # -- blocks --------------------------------------------------------------------------

    def _bounds(self, plan: EpochPlan, number: int) -> list[int]:
        """Where a block's pieces start (block positions), and its size last."""
        block = plan.blocks[number]
        if not plan.shuffle or block.size == 0:
            return [0, block.size]
        batch = plan.batch_size
        step = -(-PIECE_ROWS // batch) * batch
        # the first piece ends at a batch boundary of the epoch (a message stopping there
        # holds whole batches), the others at multiples of the step
        first = -(-(block.start + FIRST_PIECE_ROWS) // batch) * batch - block.start
        after = ((block.start + first) // step + 1) * step - block.start
        if after - first < FIRST_PIECE_ROWS:  # no sliver of a piece after the first
            after += step
        inner = [first] if first < block.size else []
        return [0, *inner, *range(after, block.size, step), block.size]

    def boundary(self, plan: EpochPlan, seq: int) -> int:
        """The first global sequence number after ``seq`` where a new block or piece starts.

        Rows on either side of it are in different tables: a message that crosses it is a
        copy, one that stops there is a slice.
        """
        number = int(plan.block_of(np.array([seq]))[0])
        block = plan.blocks[number]
        for bound in self._bounds(plan, number)[1:]:
            if block.start + bound > seq:
                return block.start + bound
        return block.start + block.size

    def _start(self, plan: EpochPlan, number: int, urgent: bool) -> _Block:
        """Start reading a block: its shards on their lane, then its gather on ``cpu``.

        ``urgent``: a stream waits for it (its tasks go ahead of read-ahead in their lanes).
        """
        block = plan.blocks[number]
        bounds = self._bounds(plan, number)
        IDLE_RELEASE.block_started()
        state = _Block(number, block.start, bounds, [Future() for _ in bounds[:-1]], urgent=urgent)
        if not block.shard_slots:
            for future in state.pieces:
                future.set_result(_Piece(0, 0, self.reader.schema.empty_table()))
            return state
        lane = self.reader.main.lane
        reads = [self._read_on(lane, state, slot, urgent) for slot in block.shard_slots]
        # a shuffled block's order is drawn while its shards are read (it needs no row);
        # a block in order has none to draw
        order: Future[BlockOrder | None] = Future()
        if plan.shuffle:
            order = self.pool.submit(CPU, self._order, plan, state, urgent=urgent, tag=state)
        else:
            order.set_result(None)
        left = [len(reads) + 1]
        count = threading.Lock()
        # the callbacks reach the futures through this list, emptied once the gather has
        # them: a future keeps its callbacks, and a cycle would keep a read block (and its
        # order) until the garbage collector happens to run
        waiting: list[tuple[list[Future[ShardRead]], Future[BlockOrder | None]]] = [(reads, order)]

        def one_done(_: Future[ShardRead] | Future[BlockOrder | None]) -> None:
            with count:
                left[0] -= 1
                found = waiting.pop() if left[0] == 0 else None
            if found is not None:
                self.pool.submit(CPU, self._gather, plan, state, *found,
                                 urgent=state.urgent, tag=state)  # fmt: skip

        for read in reads:
            read.add_done_callback(one_done)
        order.add_done_callback(one_done)
        return state

    def _order(self, plan: EpochPlan, state: _Block) -> BlockOrder | None:
        """A block's order, its head drawn (runs on the ``cpu`` lane); none if nobody reads it."""
        if state.abandoned:
            return None
        return plan.draw_order(state.number)

    def _go_on(self, state: _Block) -> None:
        """Raise ``Abandoned`` for a block nobody reads any more (its gather stops)."""
        if state.abandoned:
            raise Abandoned(f"block {state.number} of iteration {self._iteration_id}")

    def _gather(
        self,
        plan: EpochPlan,
        state: _Block,
        reads: list[Future[ShardRead]],
        order: Future[BlockOrder | None],
    ) -> None:
        """Lay a block's shards end to end in the epoch's order (runs on the ``cpu`` lane)."""
        try:
            self._go_on(state)
            table, unreadable, absent = self._joined(plan, state, reads)
            if not plan.shuffle:
                piece = self._filtered(_Piece(0, table.num_rows, table, unreadable, absent))
                state.hold(self.memory.reserve(piece.nbytes))
                state.pieces[0].set_result(piece)
                return
            drawn = order.result()
            assert drawn is not None  # a shuffled block nobody reads stopped at _go_on
            state.hold(self.memory.reserve(table_bytes(table) * (2 if self.filter else 1)))
        except BaseException as exc:
            self._fail(state, exc)
            return
        self._gather_pieces(state, table, unreadable, absent, drawn, 0)

    def _gather_pieces(
        self,
        state: _Block,
        table: pa.Table,
        unreadable: np.ndarray | None,
        absent: np.ndarray | None,
        drawn: BlockOrder,
        first: int,
    ) -> None:
        """A shuffled block's pieces from ``first`` on (runs on the ``cpu`` lane).

        The first piece first (a first batch waits for it), from the shards as read and the
        order's head; then the rest of the order, and the other pieces one after the other
        (two random gathers at once only fight over the memory bus), from the shards laid
        end to end once: Arrow's take would lay a chunked column end to end on every call.
        A block no stream waits for gives its slot to urgent work between pieces, and goes
        on behind it.
        """
        try:
            for index in range(first, len(state.pieces)):
                self._go_on(state)
                if index > first and not state.urgent and self.pool.urgent_waiting(CPU):
                    self.pool.submit(CPU, self._gather_pieces, state, table, unreadable,
                                     absent, drawn, index, tag=state)  # fmt: skip
                    return
                a, b = state.bounds[index], state.bounds[index + 1]
                if index == 1:  # a block nobody reads any more stops between these steps
                    # the rest of the order: drawn here, after the first piece, not beside
                    # it (another task drawing it took a core from the first batch)
                    drawn.full()
                    self._go_on(state)
                    if any(c.num_chunks > 1 for c in table.columns):
                        pool = pool_for(largest_column_bytes(table))
                        table = table.combine_chunks(memory_pool=pool)
                        self._go_on(state)
                rows = drawn.upto(b)[a:]
                state.pieces[index].set_result(self._piece(table, unreadable, absent, rows, a, b))
        except BaseException as exc:
            self._fail(state, exc)

    @staticmethod
    def _fail(state: _Block, exc: BaseException) -> None:
        """The pieces of a block not gathered yet raise ``exc``."""
        for future in state.pieces:
            if not future.done():
                future.set_exception(exc)

    def _joined(
        self, plan: EpochPlan, state: _Block, reads: list[Future[ShardRead]]
    ) -> tuple[pa.Table, np.ndarray | None, np.ndarray | None]:
        """A block's shards laid end to end as read (chunks side by side), with their masks."""
        schema = self.reader.schema
        tables: list[pa.Table] = []
        unreadable: list[np.ndarray | None] = []
        absent: list[np.ndarray | None] = []
        for slot, read in zip(plan.blocks[state.number].shard_slots, reads, strict=True):
            result = read.result()
            if result is None:  # unreadable and skipped: placeholder rows, marked failed
                rows = self.shards[slot][1]
                tables.append(
                    pa.table({f.name: pa.nulls(rows, f.type) for f in schema}, schema=schema)
                )
                unreadable.append(np.ones(rows, dtype=bool))
                absent.append(None)
            else:
                tables.append(result[0])
                unreadable.append(None)
                absent.append(result[1])
        sizes = [t.num_rows for t in tables]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        return table, joined_masks(unreadable, sizes), joined_masks(absent, sizes)

    def _piece(
        self,
        table: pa.Table,
        unreadable: np.ndarray | None,
        absent: np.ndarray | None,
        rows: np.ndarray,
        start: int,
        stop: int,
    ) -> _Piece:
        """Block positions ``[start, stop)``, the block's ``rows``, in the epoch's order.

        One ``take`` of them.
        """
        piece = _Piece(
            start,
            stop,
            take_rows(table, rows),
            None if unreadable is None else unreadable[rows],
            None if absent is None else absent[rows],
        )
        return self._filtered(piece)

    def _filtered(self, piece: _Piece) -> _Piece:
        """The piece with what the iteration's filters leave of it (none: as it is).

        The kept rows are one ``take`` of their positions (a quarter faster than a boolean
        filter of 100-byte strings when every other row stays); those positions also map
        a sample to its kept row (no running count over the piece).
        """
        if self.filter is None:
            return piece
        size = piece.stop - piece.start
        failed = np.zeros(size, dtype=bool) if piece.unreadable is None else piece.unreadable.copy()
        candidates = ~failed
        if piece.absent is not None:  # an inner join left them out: they count as filtered
            candidates &= ~piece.absent
        keep = np.zeros(size, dtype=bool)
        chosen = np.flatnonzero(candidates)
        if len(chosen):
            table = piece.table if len(chosen) == size else piece.table.take(pa.array(chosen))
            kept = np.empty(len(chosen), dtype=bool)
            lost = np.empty(len(chosen), dtype=bool)
            for offset in range(0, len(chosen), PIECE_ROWS):
                part = table.slice(offset, PIECE_ROWS).combine_chunks().to_batches()
                if not part:
                    continue
                k, f = self.filter(part[0])
                kept[offset : offset + len(k)] = k
                lost[offset : offset + len(f)] = f
            if len(chosen) == size:  # every row was a candidate: no scatter
                keep, failed = kept, failed | lost
            else:
                keep[chosen] = kept
                failed[chosen] |= lost
        piece.keep, piece.failed = keep, failed
        piece.kept_rows = np.flatnonzero(keep)
        piece.kept_table = _cut(piece.table, piece.kept_rows)
        return piece

    def _block(self, plan: EpochPlan, number: int, urgent: bool = False) -> _Block:
        """A block, started if it is not kept; ``urgent``: a stream waits for it now."""
        key = (plan.epoch, number)
        with self._lock:
            state = self._cache.get(key)
            if state is None:
                while len(self._cache) >= self._capacity:  # make room first: it unreserves
                    self._cache.popitem(last=False)[1].release()
                state = self._cache[key] = self._start(plan, number, urgent)
                return state
            self._cache.move_to_end(key)
        if urgent and not state.urgent:  # read ahead, its tasks may still be queued
            state.urgent = True
            self.pool.promote(state)
        return state

    def _wait(
        self,
        plan: EpochPlan,
        state: _Block,
        index: int,
        check: Callable[[], None] | None = None,
    ) -> _Piece:
        """A piece of a block (waits for its read; a failed read is tried again next time).

        ``check`` is called every ``CHECK_SECONDS`` of the wait (see ``rows``); what it
        raises leaves the block as it is, for the other streams.
        """
        stopped: list[BaseException] = []

        def checked() -> None:
            assert check is not None
            try:
                check()
            except BaseException as exc:
                stopped.append(exc)
                raise

        try:
            return wait_for(
                state.pieces[index],
                self.pool.timeout,
                f"reading block {state.number} of iteration {self._iteration_id} "
                f"({self.reader.main.location.shown})",
                checked if check is not None else None,
                CHECK_SECONDS,
            )
        except BaseException as exc:
            if stopped and exc is stopped[-1]:  # the stream stops, not the block's read
                raise
            with self._lock:
                key = (plan.epoch, state.number)
                if self._cache.get(key) is state:
                    del self._cache[key]
                    state.release()
            raise

    def prefetch(self, plan: EpochPlan, number: int, urgent: bool = False) -> None:
        """Start reading a block the streams will need soon (``urgent``: one waits for it)."""
        if number < len(plan.blocks):
            self._block(plan, number, urgent)

    def _read_ahead(self, plan: EpochPlan, state: _Block) -> None:
        """Start the blocks after a stream's current one (two when the budget has room).

        The one after the next is started while what is reserved leaves half the budget
        free. A shuffled block's gather takes longer than streaming it (random reads of the
        whole block), so with only the next block started the stream caught up with it and
        waited for piece after piece (a quarter of a 1M-row text epoch, traced). Two ahead
        keep both ``cpu`` lane slots gathering. Shuffled text epochs, one server each way
        (large buffers on mimalloc in both): 2.43-3.00 M rows/s with one ahead, 3.00-3.42
        with two (4 rounds); in a second run, medians of 3 rounds 2.72 and 2.97.
        """
        number = state.number
        self.prefetch(plan, number + 1)
        held = state.reservation
        if (
            number + 2 < len(plan.blocks)
            and held is not None
            and self.memory.reserved_bytes + held.nbytes <= self.memory.max_bytes // 2
        ):
            self.prefetch(plan, number + 2)

    def _pieces(
        self, plan: EpochPlan, seq: np.ndarray, check: Callable[[], None] | None = None
    ) -> list[tuple[_Piece, np.ndarray]]:
        """The pieces ascending global ``seq`` fall in, and their rows in each."""
        found: list[tuple[_Piece, np.ndarray]] = []
        for number, start, stop in plan.segments(seq):
            state = self._block(plan, number, urgent=True)
            if not plan.shuffle:  # the next shards' reads side by side with this one's
                self._read_ahead(plan, state)
            positions = seq[start:stop] - state.start
            first, last = state.piece_of(int(positions[0])), state.piece_of(int(positions[-1]))
            cuts = np.searchsorted(positions, state.bounds[first + 1 : last + 1])
            edges = [0, *cuts.tolist(), len(positions)]
            for index in range(first, last + 1):
                a, b = edges[index - first], edges[index - first + 1]
                if b > a:
                    try:
                        piece = self._wait(plan, state, index, check)
                    except Abandoned:  # cleared as this stream began (the last one ended)
                        state = self._block(plan, number, urgent=True)
                        piece = self._wait(plan, state, index, check)
                    found.append((piece, positions[a:b] - piece.start))
            if plan.shuffle:
                # shuffled, the blocks after this one once its rows are here: started
                # before, their gathers fought a first batch's piece for the cores (their
                # shards' reads would queue behind this block's anyway)
                self._read_ahead(plan, state)
        return found

    def rows(
        self, plan: EpochPlan, seq: np.ndarray, check: Callable[[], None] | None = None
    ) -> Rows:
        """Rows for ascending global sequence numbers of an epoch, in that order.

        ``check`` is called while a piece is waited for (every ``CHECK_SECONDS``); what it
        raises ends the wait (a stream whose client went away stops at once, and the
        blocks only it read are let go sooner).
        """
        pieces = [piece.rows(local) for piece, local in self._pieces(plan, seq, check)]
        if not pieces:
            return Rows(self.reader.schema.empty_table())
        return Rows.concat(pieces)

    def kept(
        self, plan: EpochPlan, seq: np.ndarray, check: Callable[[], None] | None = None
    ) -> Kept:
        """What the iteration's filters leave of ascending global sequence numbers.

        Without filters, every readable, present sample is kept. ``check``: as ``rows``'.
        """
        if self.filter is None:
            rows = self.rows(plan, seq, check)
            failed = np.zeros(len(seq), dtype=bool) if rows.unreadable is None else rows.unreadable
            keep = ~failed if rows.absent is None else ~failed & ~rows.absent
            table = rows.table if keep.all() else rows.table.filter(pa.array(keep))
            return Kept(table, keep, failed)
        pieces = [piece.kept(local) for piece, local in self._pieces(plan, seq, check)]
        if not pieces:
            empty = np.zeros(0, dtype=bool)
            return Kept(self.reader.schema.empty_table(), empty, empty)
        return Kept.concat(pieces)

    def hold_read_ahead(self) -> Reservation:
        """Reserve, in the memory budget, what one stream may hold ahead of its loop.

        At most an eighth of the budget: what a stream holds ahead is usually far less
        than its bound, and the blocks it streams from need the room.
        """
        return self.memory.reserve(min(self.read_ahead_bytes, self.memory.max_bytes // 8), False)

    def clear(self) -> None:
        """Drop every kept block (the allocators give their memory back once idle)."""
        with self._lock:
            blocks = list(self._cache.values())
            self._cache.clear()
        for state in blocks:
            state.abandoned = True  # no stream reads (or will read) these: stop gathering
            state.release()
        if blocks:
            del state, blocks
            # the allocators keep the freed pages for the next blocks: given back once idle
            room = self.memory.max_bytes - self.memory.used_bytes
            IDLE_RELEASE.later(max(0, min(self.memory.max_bytes // KEEP_FRACTION, room)))
