"""The iteration engine: plans, block reads, per-rank streams, acknowledgements, progress."""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from ..catalog import Catalog, new_id
from ..protocol import iterations
from ..protocol.errors import (
    InvalidArgument,
    IterationConflict,
    LavenderError,
    SchemaMismatch,
)
from ..protocol.iterations import IterationProgress, IterationRecord, RankProgress
from ..protocol.ranges import RangeSet, as_array, runs
from ..transforms import Outcome, Pipeline, Plugins
from ..transforms.pipeline import pipeline_spec
from .plan import EpochPlan
from .pool import TransformPool
from .progress import RankState, StreamKey
from .reading import DatasetReader
from .service import LavenderService
from .world import World, replication_partitions

__all__ = ["IterationManager", "LiveIteration"]

log = logging.getLogger(__name__)

MAX_LISTED_POSITIONS = 1000
MESSAGE_BYTES = 4 << 20
MESSAGE_ROWS = 1 << 16  # bounds the read-ahead of small rows too
MAX_CHUNKS = 512


def _spec_differences(stored: dict[str, Any], asked: dict[str, Any]) -> str:
    keys = sorted(set(stored) | set(asked))
    return ", ".join(
        f"{k}: {stored.get(k)!r} != {asked.get(k)!r}" for k in keys if stored.get(k) != asked.get(k)
    )


class BlockCache:
    """Blocks of an iteration read once and shared by every rank's stream, bounded in count.

    Loads run on a thread pool so the next block is read while the current one streams;
    ranks a block apart share the loads instead of each reading every shard.
    """

    def __init__(self, load: Any, executor: ThreadPoolExecutor, capacity: int = 3) -> None:
        self._load = load
        self._executor = executor
        self._capacity = capacity
        self._blocks: OrderedDict[int, Future[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def _future(self, number: int) -> Future[Any]:
        with self._lock:
            future = self._blocks.get(number)
            if future is None:
                future = self._executor.submit(self._load, number)
                self._blocks[number] = future
                while len(self._blocks) > self._capacity:
                    self._blocks.popitem(last=False)
            else:
                self._blocks.move_to_end(number)
            return future

    def get(self, number: int) -> Any:
        """The loaded block (waits for its load)."""
        future = self._future(number)
        try:
            return future.result()
        except BaseException:
            with self._lock:  # a failed load is retried by the next reader, not cached
                if self._blocks.get(number) is future:
                    del self._blocks[number]
            raise

    def prefetch(self, number: int) -> None:
        """Start loading a block the streams will need soon."""
        self._future(number)

    def clear(self) -> None:
        """Drop every block (no stream needs them now)."""
        with self._lock:
            self._blocks.clear()


class LiveIteration:
    """One iteration in memory: its plan, the state of each rank, and its shared reads."""

    def __init__(
        self,
        record: IterationRecord,
        catalog: Catalog,
        service: LavenderService,
        executor: ThreadPoolExecutor,
        shard_reads: ThreadPoolExecutor,
        plugins: Plugins | None = None,
        pool: TransformPool | None = None,
        lease_seconds: float | None = None,
    ) -> None:
        self.record = record
        self.parked = False
        self._shard_reads = shard_reads
        self.pool = pool
        self._row_cost: float | None = None
        self.id = record.id
        self.spec = iterations.IterationSpec.model_validate(record.spec)
        self.catalog = catalog
        self.service = service
        self.snapshot: list[tuple[int, int]] = [
            (int(index), int(rows)) for index, rows in record.plan["shards"]
        ]
        self.plan = EpochPlan(
            [rows for _, rows in self.snapshot],
            self.spec.batch_size,
            partitions=len(
                set(replication_partitions(self.spec.world_size, self.spec.replication_pg))
            ),
            shuffle=self.spec.shuffle,
            seed=int(record.plan["seed"]),
            block_size=self.spec.shuffle_block_size,
            drop_last=self.spec.drop_last,
        )
        self.partitions = replication_partitions(self.spec.world_size, self.spec.replication_pg)
        self.pipeline = build_pipeline(
            plugins or Plugins.load(entry_points=False),
            self.spec,
            service.get_dataset(dataset_id=self.spec.dataset_id).uid_column_name,
        )
        self.pipeline_spec = pipeline_spec(
            [(s.name, s.params) for s in self.pipeline.filters],
            (self.pipeline.collater.name, self.pipeline.collater.params)
            if self.pipeline.collater
            else None,
            [(s.name, s.params) for s in self.pipeline.preprocessors],
            self.spec.max_retry_count,
            self.spec.skip_on_failure,
            self.pipeline.uid_column,
        )
        self._output_schema: pa.Schema | None = None
        self.lock = threading.Lock()
        self._save_lock = threading.Lock()
        saved = {r.rank: r for r in catalog.load_progress(self.id)}
        self.ranks = [
            RankState.restore(
                saved.get(rank),
                rank,
                self.plan.partition_size(self.partitions[rank]),
                self.spec.batch_size,
                lease_seconds,
            )
            for rank in range(self.spec.world_size)
        ]
        self.updated_at = max((r.updated_at for r in saved.values()), default=record.created_at)
        self._reader: DatasetReader | None = None
        self._active = 0
        self._blocks = BlockCache(self._load_block, executor)

    # -- reading -------------------------------------------------------------------------

    @property
    def reader(self) -> DatasetReader:
        """The reader of the iteration's shardsets and columns (opened on first read)."""
        if self._reader is None:
            dataset = self.service.get_dataset(dataset_id=self.spec.dataset_id)
            self._reader = self.service.reader(
                dataset, self.spec.shardsets, self.spec.columns, self.spec.join
            )
        return self._reader

    @property
    def plain(self) -> bool:
        """Rows go out as read: no transform, and no inner join leaving samples out."""
        return self.pipeline.identity and self.spec.join == "left"

    @property
    def schema(self) -> pa.Schema:
        """The schema of the rows read (before transforms)."""
        return self.reader.schema

    @property
    def output_schema(self) -> pa.Schema:
        """The schema of the batches sent: after the collater and preprocessors.

        Found by running them on the dataset's first rows; when that fails, the schema of
        the rows read (the first message tells the truth then).
        """
        if self._output_schema is None:
            schema = self.reader.schema
            if self.pipeline.transforms_batches:
                sample = next(self.reader.iter_rows(0, 2), None)
                if sample is not None and sample.num_rows:
                    try:
                        schema = self.pipeline.process(
                            sample.combine_chunks().to_batches()[0]
                        ).result.schema
                    except Exception:
                        log.info("iteration %s: no output schema from the first rows", self.id)
            self._output_schema = schema
        return self._output_schema

    def _read_shard(self, slot: int) -> tuple[pa.Table, np.ndarray | None] | None:
        """A main shard's joined rows, and those an inner join leaves out.

        See ``DatasetReader.read_joined``; None when it cannot be read and failures are
        skipped.
        """
        index, rows = self.snapshot[slot]
        error: Exception | None = None
        for _ in range(self.spec.max_retry_count + 1):
            try:
                table, missing = self.reader.read_joined(self.reader.main_shard(index))
            except (LavenderError, OSError, pa.ArrowException) as exc:
                error = exc
                continue
            if table.num_rows != rows:
                error = SchemaMismatch(
                    f"shard {index} of the main shardset has {table.num_rows} rows, "
                    f"{rows} when iteration {self.id} started: it was rewritten"
                )
                continue
            return table, missing
        assert error is not None
        if not self.spec.skip_on_failure:
            raise error
        log.warning("iteration %s: skipping unreadable shard %d (%d samples): %s",
                    self.id, index, rows, error)  # fmt: skip
        return None

    def _load_block(self, number: int) -> tuple[pa.Table, np.ndarray | None, np.ndarray | None]:
        """A block's rows laid end to end, with two masks (each None when no row is set).

        Which rows could not be read, and which an inner join leaves out.
        """
        block = self.plan.blocks[number]
        reads = [self._shard_reads.submit(self._read_shard, s) for s in block.shard_slots]
        tables: list[pa.Table] = []
        bad: list[np.ndarray | None] = []
        absent: list[np.ndarray | None] = []
        for slot, read in zip(block.shard_slots, reads, strict=True):
            rows = self.snapshot[slot][1]
            result = read.result()
            if result is None:  # unreadable and skipped: placeholder rows, marked failed
                table = pa.table(
                    {f.name: pa.nulls(rows, f.type) for f in self.schema}, schema=self.schema
                )
                bad.append(np.ones(rows, dtype=bool))
                absent.append(None)
            else:
                table, missing = result
                bad.append(None)
                absent.append(missing)
            tables.append(table)
        if not tables:
            return self.schema.empty_table(), None, None
        table = pa.concat_tables(tables)
        sizes = [t.num_rows for t in tables]
        # random access (take) is fast on one chunk; plain slices need no copy
        table = table.combine_chunks() if self.plan.shuffle else table
        return table, _joined_masks(bad, sizes), _joined_masks(absent, sizes)

    def read(self, seq: np.ndarray) -> tuple[pa.Table, np.ndarray | None, np.ndarray | None]:
        """Rows for ascending global sequence numbers, in that order.

        Also says which rows belong to unreadable shards that were skipped, and which an
        inner join leaves out (each None when none).
        """
        pieces: list[pa.Table] = []
        failed: list[np.ndarray | None] = []
        missing: list[np.ndarray | None] = []
        for number, start, stop in self.plan.segments(seq):
            part = seq[start:stop]
            if number + 1 < len(self.plan.blocks):
                self._blocks.prefetch(number + 1)  # loads side by side with this one
            table, bad, absent = self._blocks.get(number)
            rows = self.plan.rows_in_block(number, part)
            first = int(rows[0])
            if int(rows[-1]) - first == len(rows) - 1 and not self.plan.shuffle:
                pieces.append(table.slice(first, len(rows)))
            else:
                pieces.append(table.take(pa.array(rows)))
            failed.append(None if bad is None else bad[rows])
            missing.append(None if absent is None else absent[rows])
        table = pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)
        sizes = [p.num_rows for p in pieces]
        return table, _joined_masks(failed, sizes), _joined_masks(missing, sizes)

    # -- streams -------------------------------------------------------------------------

    def stream(
        self, ticket: iterations.IterationTicket
    ) -> tuple[pa.Schema, Iterator[tuple[pa.RecordBatch, pa.Buffer]]]:
        """One rank's (or one worker's) messages, each with its ``BatchMetadata`` JSON.

        With transforms the first message is made before answering: its schema is the
        stream's.
        """
        if ticket.rank >= self.spec.world_size:
            raise InvalidArgument(
                f"rank {ticket.rank} is outside iteration {self.id}'s world of "
                f"{self.spec.world_size}"
            )
        world = World(
            rank=ticket.rank,
            world_size=self.spec.world_size,
            replication_pg=(
                tuple(tuple(g) for g in self.spec.replication_pg)
                if self.spec.replication_pg
                else None
            ),
            worker=ticket.worker,
            num_workers=ticket.num_workers,
        )
        state = self.ranks[ticket.rank]
        key: StreamKey = (ticket.worker, ticket.num_workers)
        schema = self.schema  # fail before streaming when the data is gone
        del schema
        with self.lock:
            generation = state.open_stream(key)
        messages = self._batches(world, state, key, generation)
        if self.plain:
            return self.schema, messages
        first = next(messages, None)
        if first is None:
            return self.output_schema, iter(())
        return first[0].schema, itertools.chain([first], messages)

    def _batches(
        self, world: World, state: RankState, key: StreamKey, generation: int
    ) -> Iterator[tuple[pa.RecordBatch, pa.Buffer]]:
        """Messages of consecutive batches: one record batch, split by its metadata.

        Several batches travel in one Flight message (about ``MESSAGE_BYTES``): per-message
        costs are paid once for many small batches. The first message holds one batch so
        the first batch arrives as soon as possible.
        """
        with self.lock:
            self._active += 1
        try:
            if self.plain:
                yield from self._messages(world, state, key, generation)
            else:
                yield from self._transformed(world, state, key, generation)
        finally:
            with self.lock:
                self._active -= 1
                idle = self._active == 0
            if idle:
                self._blocks.clear()  # memory is held only while someone streams

    def _messages(
        self, world: World, state: RankState, key: StreamKey, generation: int
    ) -> Iterator[tuple[pa.RecordBatch, pa.Buffer]]:
        cursor = 0
        partition = world.partition
        chunks = 1
        while True:
            with self.lock:
                if self.parked or not state.is_current(key, generation):
                    return  # the server is stopping, or a newer stream of this worker took over
                units, cursor = state.next_work(world, key, cursor, chunks)
                self.updated_at = time.time()
            if not units:
                return
            local = as_array([r for unit in units for r in unit])
            seq = self.plan.to_global(partition, local)
            table, failed, _ = self.read(seq)  # a left join: no sample is left out
            described = [[sum(b - a for a, b in unit), unit] for unit in units]
            if failed is not None and failed.any():  # rows of unreadable, skipped shards
                self._settle(state, local[failed], "failed")
                table, local, seq = table.filter(pa.array(~failed)), local[~failed], seq[~failed]
                described = _without(described, set(local.tolist()))
                if not described:
                    continue
            message = self._message(table, state, described, self.plan.positions(seq))
            yield message
            if message[0].num_rows:
                row_bytes = max(1, message[0].nbytes // message[0].num_rows)
                chunks = max(
                    1,
                    min(
                        MAX_CHUNKS,
                        MESSAGE_BYTES // (row_bytes * state.batch_size),
                        MESSAGE_ROWS // state.batch_size,
                    ),
                )

    def _transformed(
        self, world: World, state: RankState, key: StreamKey, generation: int
    ) -> Iterator[tuple[pa.RecordBatch, pa.Buffer]]:
        """Messages when the iteration filters, collates or preprocesses.

        Filters run here on whole read spans; the staying samples are packed into full
        batches (a partial one waits for the next span); batches are collated and
        preprocessed in the worker pool (or here without one), in order.
        """
        cursor = 0
        partition = world.partition
        batch_size = state.batch_size
        carried: list[pa.Table] = []
        carried_seq: list[np.ndarray] = []
        # every sample this stream took and no batch has spanned yet (filtered ones too)
        consumed = np.zeros(0, dtype=np.int64)
        schema: pa.Schema | None = None

        def finish() -> None:  # what no batch spans (filtered or failed) leaves the stream
            if len(consumed):
                tail = runs(consumed)
                assert tail is not None
                with self.lock:
                    state.release(key, tail)

        # small first spans: the first batch comes soon; then larger ones, to fill the workers
        span = max(1, self.pool.workers if self.pool is not None else 1)
        while True:
            with self.lock:
                if self.parked or not state.is_current(key, generation):
                    return
                units, cursor = state.next_work(world, key, cursor, span)
                span = min(span * 2, self._span_chunks)
                self.updated_at = time.time()
            if units:
                local = as_array([r for unit in units for r in unit])
                consumed = np.concatenate([consumed, local])
                table, unreadable, missing = self.read(self.plan.to_global(partition, local))
                if unreadable is not None and unreadable.any():
                    self._settle(state, local[unreadable], "failed", release=False)
                    table, local = table.filter(pa.array(~unreadable)), local[~unreadable]
                    if missing is not None:
                        missing = missing[~unreadable]
                if missing is not None:  # an inner join leaves them out: they count as filtered
                    self._settle(state, local[missing], "filtered", release=False)
                    table, local = table.filter(pa.array(~missing)), local[~missing]
                if not table.num_rows:
                    continue
                keep, failed = self.pipeline.filter(table.combine_chunks().to_batches()[0])
                self._settle(state, local[~keep & ~failed], "filtered", release=False)
                self._settle(state, local[failed], "failed", release=False)
                carried.append(table.filter(pa.array(keep)))
                carried_seq.append(local[keep])
            pending = sum(len(s) for s in carried_seq)
            if not units and pending and self.spec.drop_last:
                self._settle(state, np.concatenate(carried_seq), "filtered", release=False)
                finish()
                return
            if pending < batch_size and units:
                continue
            if not pending:
                if not units:
                    finish()
                    return
                continue
            rows = pa.concat_tables(carried).combine_chunks()
            seqs = np.concatenate(carried_seq)
            full = pending // batch_size * batch_size if units else pending
            inputs = [
                (
                    rows.slice(s, batch_size).to_batches()
                    or [pa.RecordBatch.from_pylist([], rows.schema)]
                )[0]
                for s in range(0, full, batch_size)
            ]
            carried = [rows.slice(full)]
            carried_seq = [seqs[full:]]
            outputs = self._process(inputs)
            pieces, described, delivered = [], [], []
            for index, outcome in enumerate(outputs):
                batch_seq = seqs[index * batch_size : index * batch_size + len(inputs[index])]
                failed_rows = np.zeros(len(batch_seq), dtype=bool)
                failed_rows[outcome.failed] = True
                self._settle(state, batch_seq[failed_rows], "failed", release=False)
                kept = batch_seq[~failed_rows]
                if outcome.result is None or (not len(kept) and not outcome.result.num_rows):
                    continue  # the next batch's span takes these in
                # the batch spans everything consumed up to its last sample (filtered too)
                cut = int(np.searchsorted(consumed, batch_seq[-1], side="right"))
                spanned, consumed = consumed[:cut], consumed[cut:]
                result = outcome.result
                if schema is None:
                    schema = result.schema
                elif not result.schema.equals(schema):
                    result = result.cast(schema)
                pieces.append(result)
                described.append([result.num_rows, runs(spanned)])
                delivered.append(kept)
            if pieces:
                positions = self.plan.positions(
                    self.plan.to_global(partition, np.sort(np.concatenate(delivered)))
                )
                yield self._message(pa.Table.from_batches(pieces), state, described, positions)
            if not units and not sum(len(s) for s in carried_seq):
                finish()
                return

    def _message(
        self, table: pa.Table, state: RankState, described: list[list[Any]], positions: np.ndarray
    ) -> tuple[pa.RecordBatch, pa.Buffer]:
        """One Flight message: the batches' rows as one record batch, and its metadata."""
        batches = table.combine_chunks().to_batches()
        message = batches[0] if batches else self.schema.empty_table().to_batches()[0]
        metadata = {
            "v": 1,
            "iteration_id": self.id,
            "rank": state.rank,
            "batches": described,
            **iterations.encode_positions(positions),
        }
        return message, pa.py_buffer(json.dumps(metadata).encode())

    @property
    def _span_chunks(self) -> int:
        return max(1, min(MAX_CHUNKS, (1 << 16) // self.spec.batch_size))

    def _process(self, inputs: list[pa.RecordBatch]) -> list[Outcome]:
        """Collate and preprocess, in the worker pool when the work outweighs moving the data.

        The first batches run here and are timed; the pool is used from then on only when
        they took more than ``pool.min_row_seconds`` a row (sending a batch to a worker
        process and back costs about that much).
        """
        if (
            self.pool is None
            or not self.pipeline.transforms_batches
            or (self._row_cost is not None and self._row_cost < self.pool.min_row_seconds)
        ):
            return [self.pipeline.process(batch) for batch in inputs]
        if self._row_cost is None:
            started = time.perf_counter()
            outcomes = [self.pipeline.process(batch) for batch in inputs]
            rows = max(1, sum(batch.num_rows for batch in inputs))
            self._row_cost = (time.perf_counter() - started) / rows
            log.info(
                "iteration %s: preprocessing takes %.1f us a row: %s",
                self.id,
                self._row_cost * 1e6,
                "worker processes" if self._row_cost >= self.pool.min_row_seconds else "inline",
            )
            return outcomes
        spec = json.dumps(self.pipeline_spec)
        futures = [self.pool.submit(spec, batch) for batch in inputs]
        return [self.pool.outcome(future) for future in futures]

    def _settle(
        self, state: RankState, local: np.ndarray, outcome: str, release: bool = True
    ) -> None:
        if not len(local):
            return
        ranges = runs(np.sort(local))
        assert ranges is not None
        with self.lock:
            state.settle(ranges, state.filtered if outcome == "filtered" else state.failed, release)

    # -- acknowledgements ----------------------------------------------------------------

    def ack(self, rank: int, ranges: list[tuple[int, int]]) -> int:
        """Record consumed samples of a rank and save its progress before answering."""
        if rank >= self.spec.world_size:
            raise InvalidArgument(f"rank {rank} is outside iteration {self.id}'s world")
        with self._save_lock:
            with self.lock:
                state = self.ranks[rank]
                added = state.acknowledge(ranges)
                record = state.record(self.id)
                self.updated_at = time.time()
            self.catalog.save_progress([record])
        return added

    def pushback(self) -> int:
        """Return every in-flight sample of every rank to the queue."""
        with self._save_lock:
            with self.lock:
                count = sum(state.pushback() for state in self.ranks)
                records = [state.record(self.id) for state in self.ranks]
                self.updated_at = time.time()
            self.catalog.save_progress(records)
        return count

    def park(self) -> int:
        """End every stream and save what they held as pending (the server is stopping)."""
        with self.lock:
            self.parked = True
        return self.pushback()

    # -- progress ------------------------------------------------------------------------

    def progress(self) -> IterationProgress:
        """Where every rank stands."""
        with self.lock:
            for state in self.ranks:
                state.expire()
            ranks = []
            inflight: dict[int, list[int]] = {}
            for state in self.ranks:
                held = RangeSet()
                for part in state.inflight.values():
                    held.update(part.ranges())
                positions: list[int] = []
                for a, b in held:
                    if len(positions) >= MAX_LISTED_POSITIONS:
                        break
                    local = np.arange(a, min(b, a + MAX_LISTED_POSITIONS - len(positions)))
                    seq = self.plan.to_global(self.partitions[state.rank], local)
                    positions.extend(self.plan.positions(seq).tolist())
                inflight[state.rank] = positions
                ranks.append(
                    RankProgress(
                        rank=state.rank,
                        total=state.size,
                        current=len(state.covered),
                        completed=state.completed,
                        filtered=state.filtered_count,
                        failed=state.failed_count,
                        inflight=len(held),
                        inflight_positions=positions,
                        pending=state.pending_count,
                        streams=len(state.generation),
                    )
                )
            return IterationProgress(
                id=self.id,
                dataset_id=self.spec.dataset_id,
                spec=self.record.spec,
                total=sum(r.total for r in ranks),
                current=sum(r.current for r in ranks),
                completed=sum(r.completed for r in ranks),
                filtered=sum(r.filtered for r in ranks),
                failed=sum(r.failed for r in ranks),
                inflight=inflight,
                ranks=ranks,
                created_at=self.record.created_at,
                updated_at=self.updated_at,
                done=all(state.done for state in self.ranks),
            )


def _joined_masks(masks: list[np.ndarray | None], sizes: list[int]) -> np.ndarray | None:
    """Row masks of pieces laid end to end (None for a piece with no row set, or for all)."""
    if all(mask is None or not mask.any() for mask in masks):
        return None
    return np.concatenate(
        [np.zeros(n, dtype=bool) if m is None else m for m, n in zip(masks, sizes, strict=True)]
    )


def _without(described: list[list[Any]], kept: set[int]) -> list[list[Any]]:
    """Batch descriptions keeping only the sequence numbers in ``kept`` (dropping empties)."""
    result = []
    for _, unit in described:
        values = [v for a, b in unit for v in range(a, b) if v in kept]
        if values:
            found = runs(np.array(values, dtype=np.int64))
            result.append([len(values), found])
    return result


def build_pipeline(plugins: Plugins, spec: iterations.IterationSpec, uid_column: str) -> Pipeline:
    """The transforms an iteration spec asks for, validated against the server's plugins."""
    return Pipeline.build(
        plugins,
        [(f.name, f.params) for f in spec.filters],
        (spec.collater.name, spec.collater.params) if spec.collater else None,
        [(p.name, p.params) for p in spec.preprocessors],
        spec.max_retry_count,
        spec.skip_on_failure,
        uid_column,
    )


class IterationManager:
    """Creates, reopens and serves iterations; the live ones stay in memory."""

    def __init__(
        self,
        catalog: Catalog,
        service: LavenderService,
        plugins: Plugins | None = None,
        workers: int = 0,
        read_threads: int = 2,
        lease_seconds: float | None = None,
    ) -> None:
        self.catalog = catalog
        self.lease_seconds = lease_seconds
        self.service = service
        self.plugins = plugins or Plugins.load(entry_points=False)
        self.pool = TransformPool(workers, self.plugins.modules_dir) if workers > 0 else None
        self._live: dict[str, LiveIteration] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(read_threads, thread_name_prefix="lavender-block")
        self._shard_reads = ThreadPoolExecutor(read_threads, thread_name_prefix="lavender-read")

    def close(self) -> None:
        """Stop the read threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._shard_reads.shutdown(wait=False, cancel_futures=True)
        if self.pool is not None:
            self.pool.close()

    def park(self) -> int:
        """End the streams of every live iteration; save their in-flight samples as pending.

        A resume after the restart delivers them. Answers how many were parked.
        """
        with self._lock:
            live = list(self._live.values())
        return sum(iteration.park() for iteration in live)

    def get(self, iteration_id: str) -> LiveIteration:
        """A live iteration, loaded from the catalog when needed (e.g. after a restart)."""
        with self._lock:
            live = self._live.get(iteration_id)
            if live is None:
                record = self.catalog.get_iteration(iteration_id)
                live = LiveIteration(
                    record,
                    self.catalog,
                    self.service,
                    self._executor,
                    self._shard_reads,
                    self.plugins,
                    self.pool,
                    self.lease_seconds,
                )
                self._live[iteration_id] = live
            return live

    def open(self, command: iterations.IterationCommand) -> LiveIteration:
        """Create an iteration, join the one of the same id and spec, or reopen one by id."""
        if command.spec is None:
            if command.iteration_id is None:
                raise InvalidArgument("give an iteration spec, an iteration_id, or both")
            return self.get(command.iteration_id)
        spec = command.spec
        dataset = self.service.get_dataset(dataset_id=spec.dataset_id)
        reader = self.service.reader(dataset, spec.shardsets, spec.columns, spec.join)
        replication_partitions(spec.world_size, spec.replication_pg)
        build_pipeline(self.plugins, spec, dataset.uid_column_name)  # a typo fails here
        iteration_id = command.iteration_id or new_id("it")
        seed = spec.shuffle_seed if spec.shuffle_seed is not None else secrets.randbits(63)
        snapshot = [(shard.index, shard.num_rows) for shard in reader.main_shards]
        asked = spec.model_dump(mode="json")
        plan = EpochPlan(
            [rows for _, rows in snapshot],
            spec.batch_size,
            len(set(replication_partitions(spec.world_size, spec.replication_pg))),
            spec.shuffle,
            seed,
            spec.shuffle_block_size,
            spec.drop_last,
        )
        record = IterationRecord(
            id=iteration_id,
            dataset_id=spec.dataset_id,
            spec=asked,
            plan={"shards": snapshot, "seed": seed},
            total=plan.total,
            created_at=time.time(),
        )
        stored, created = self.catalog.create_iteration(record)
        # a spec stored before a field existed reads as that field's default
        known = iterations.IterationSpec.model_validate(stored.spec).model_dump(mode="json")
        if not created and known != asked:
            raise IterationConflict(
                f"iteration {iteration_id!r} exists with another spec "
                f"({_spec_differences(known, asked)}): ranks of one job must pass the "
                "same arguments; pick a new iteration_id for a new run"
            )
        if created:
            log.info("iteration %s: %d samples, %s", iteration_id, plan.total, asked)
        return self.get(iteration_id)

    def list(self, dataset_id: str | None = None) -> list[IterationProgress]:
        """Progress of every iteration (of one dataset), newest first."""
        return [self.get(r.id).progress() for r in self.catalog.list_iterations(dataset_id)]

    def delete(self, iteration_id: str) -> None:
        """Forget an iteration."""
        self.catalog.delete_iteration(iteration_id)
        with self._lock:
            self._live.pop(iteration_id, None)
