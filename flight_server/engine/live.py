"""``LiveIteration``: one iteration served by this server: its streams, acks and progress.

Its state lives in the catalog (``store``); what it keeps in memory is what can be derived
again (the setup, the blocks being read, the pace of the loops it serves), so an idle live
iteration can be dropped and a restarted server picks up where the catalog says.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from ...protocol.errors import InvalidArgument, IterationNotFound, ServerUnavailable, StorageError
from ...protocol.iterations import (
    AckBody,
    BatchMetadata,
    IterationInfo,
    IterationProgress,
    IterationRecord,
    IterationTicket,
    encode_positions,
)
from ...protocol.ranges import RangeSet
from ...transforms import Outcome
from ..pool import TransformPool
from .batching import Message, PlainBatcher, TransformedBatcher
from .blocks import BlockReader
from .flow import RankFlow, ReadAhead
from .progress import iteration_progress
from .setup import IterationSetup
from .state import Unit, stream_key
from .store import ProgressStore, StreamHandle
from .world import World

__all__ = ["LiveIteration"]

log = logging.getLogger(__name__)

UNBOUNDED = 1 << 62
WAIT_SECONDS = 0.25
"""How often a stream waiting on its budget looks at the catalog (acks through another
server, a pushback) and at whether it should stop."""


class _Stopped(Exception):
    """The stream must end (superseded, server parking, iteration deleted, client gone)."""


class _Superseded(_Stopped):
    """The catalog has another stream in this one's place.

    A newer stream of its loop, a resumed job taking the rank over, or this server taken
    for dead after an outage put it there. Its loop, if still there, reconnects: a newer
    stream of its own session takes over.
    """


class _CatalogLost(Exception):
    """The catalog failed under the stream (down too long, or a commit of unknown outcome).

    The client reconnects, and its new stream takes over what this one held.
    """


class _StreamWork:
    """The ``Work`` a batcher does for one stream: claims within the budget."""

    def __init__(
        self,
        live: LiveIteration,
        handle: StreamHandle,
        world: World,
        flow: RankFlow,
        windowed: bool,
        cancelled: Callable[[], bool],
    ) -> None:
        self.live = live
        self.handle = handle
        self.world = world
        self.flow = flow
        self.windowed = windowed
        self.cancelled = cancelled

    def _check(self) -> None:
        if self.live.deleted:  # the reader learns why its stream ends, in one line
            raise IterationNotFound(
                f"iteration {self.live.id} was deleted while this stream read it"
            )
        if self.live.parked or self.cancelled():
            log.debug(
                "stream of rank %d stops: parked=%s deleted=%s cancelled=%s",
                self.handle.rank,
                self.live.parked,
                self.live.deleted,
                self.cancelled(),
            )
            raise _Stopped

    def room(self) -> int:
        if not self.windowed:
            return UNBOUNDED
        with self.flow.cond:
            return max(self.flow.room(self.handle), self.flow.batch_size)

    def _wait_for_room(self) -> None:
        flow = self.flow
        with flow.cond:
            while True:
                self._check()
                if flow.stale:
                    self._refresh()
                    continue
                # claim when half the budget is free: fewer, larger claims
                if flow.room(self.handle) >= max(1, flow.share() // 2) or not flow.ahead(
                    self.handle
                ):
                    return
                if not flow.cond.wait(WAIT_SECONDS):
                    self._refresh()

    def _refresh(self) -> None:
        """Re-read the rank from the catalog (called with the flow's lock held)."""
        try:
            state = self.live.store.state(
                self.handle.iteration_id, self.handle.epoch, self.handle.rank
            )
        except StorageError as exc:
            raise _CatalogLost(str(exc)) from exc
        if state is None:  # its row is gone: the iteration was deleted (through any server)
            log.debug("stream of rank %d: no state", self.handle.rank)
            self.live.deleted = True
            raise IterationNotFound(
                f"iteration {self.live.id} was deleted while this stream read it"
            )
        self.flow.learn(state)

    def claim(self, max_chunks: int) -> list[Unit]:
        self._check()
        if self.windowed:
            self._wait_for_room()
            with self.flow.cond:
                room = self.flow.room(self.handle)
            max_chunks = max(1, min(max_chunks, -(-room // self.flow.batch_size)))
        try:
            found = self.live.store.claim(self.handle, self.world, max_chunks)
        except IterationNotFound:
            self.live.deleted = True
            raise
        except StorageError as exc:
            raise _CatalogLost(str(exc)) from exc
        if found is None:
            log.debug("stream of rank %d superseded", self.handle.rank)
            raise _Superseded
        with self.flow.cond:
            for unit in found.units:
                self.flow.claimed(self.handle, unit)
        log.debug("stream of rank %d claimed %d chunks (asked %d)", self.handle.rank,
                  len(found.units), max_chunks)  # fmt: skip
        return found.units

    def drain(self) -> None:
        """Wait until the loop took everything this stream sent (windowed streams only).

        The stream then ends holding nothing ahead of the loop: what it sent stays its own
        while the loop works through it, instead of going back to the queue.
        """
        if not self.windowed:
            return
        flow = self.flow
        with flow.cond:
            while True:
                self._check()
                if flow.stale:
                    self._refresh()
                    continue
                if not flow.ahead(self.handle):
                    return
                if not flow.cond.wait(WAIT_SECONDS):
                    self._refresh()

    def release(self, ranges: list[tuple[int, int]], filtered: int, failed: int) -> None:
        try:
            self.live.store.release(self.handle, ranges, filtered, failed)
        except StorageError as exc:
            raise _CatalogLost(str(exc)) from exc
        with self.flow.cond:
            self.flow.released(self.handle, ranges)


class LiveIteration:
    """One iteration this server serves; see the module docstring.

    Args:
        record: the iteration as stored.
        setup: what the manager derived from it (built once).
        store: the iteration state in the catalog.
        blocks: threads that assemble blocks; ``shard_reads``: threads that read shards.
        pool: preprocessing worker processes (None: preprocess in this process).
        budget: the read-ahead budget of windowed streams.
    """

    def __init__(
        self,
        record: IterationRecord,
        setup: IterationSetup,
        store: ProgressStore,
        blocks: ThreadPoolExecutor,
        shard_reads: ThreadPoolExecutor,
        pool: TransformPool | None = None,
        budget: ReadAhead | None = None,
    ) -> None:
        self.record = record
        self.id = record.id
        self.spec = record.spec
        self.setup = setup
        self.store = store
        self.pool = pool
        self.budget = budget or ReadAhead()
        self.blocks = BlockReader(
            setup.reader,
            setup.plan.shards,
            setup.spec.max_retry_count,
            setup.spec.skip_on_failure,
            blocks,
            shard_reads,
            iteration_id=record.id,
        )
        self.parked = False
        self.deleted = False
        self.last_used = time.monotonic()
        self._flows: dict[tuple[int, int], RankFlow] = {}
        self._open: dict[StreamHandle, RankFlow] = {}
        self._cancel_checks: dict[StreamHandle, Callable[[], bool]] = {}
        self._lock = threading.Lock()
        self._row_cost: float | None = None
        self._output_schema: pa.Schema | None = None
        self.samples_sent = 0
        """Samples the batches of its streams spanned, since it was loaded (a rate's count)."""

    # -- what it is ----------------------------------------------------------------------

    @property
    def schema(self) -> pa.Schema:
        """The schema of the rows read (before transforms)."""
        return self.setup.reader.schema

    @property
    def output_schema(self) -> pa.Schema:
        """The schema of the batches sent: after the collater and preprocessors.

        Found by running them on the dataset's first rows; when that fails, the schema of
        the rows read (the first message tells the truth then).
        """
        if self._output_schema is None:
            pipeline = self.setup.pipeline
            schema = self.schema
            if pipeline.transforms_batches:
                declared = pipeline.check_schema(self.schema)
                schema = declared if declared is not None else self._sampled_schema()
            self._output_schema = schema
        return self._output_schema

    def _sampled_schema(self) -> pa.Schema:
        """The schema of what the first rows become; the read schema when that fails.

        In a worker process when there are workers: user code never runs in the server.
        """
        sample = next(self.setup.reader.iter_rows(0, 2), None)
        if sample is None or not sample.num_rows:
            return self.schema
        batch = sample.combine_chunks().to_batches()[0]
        try:
            if self.pool is not None and not self.setup.pipeline.only_builtins:
                spec = json.dumps(self.setup.worker_spec())
                outcome = self.pool.outcome(self.pool.submit(spec, batch))
            else:
                outcome = self.setup.pipeline.process(batch)
            if outcome.result is not None:
                return outcome.result.schema
        except Exception:
            log.info("iteration %s: no output schema from the first rows", self.id)
        return self.schema

    def info(self) -> IterationInfo:
        """What a FlightInfo says of the iteration."""
        return IterationInfo(
            iteration_id=self.id,
            spec=self.spec,
            seed=self.setup.plan.seed,
            total=self.setup.total,
        )

    @property
    def open_streams(self) -> list[StreamHandle]:
        """The streams this server is sending now."""
        with self._lock:
            return list(self._open)

    def _flow(self, epoch: int, rank: int) -> RankFlow:
        with self._lock:
            flow = self._flows.get((epoch, rank))
            if flow is None:
                flow = self._flows[(epoch, rank)] = RankFlow(self.spec.batch_size, self.budget)
            return flow

    def epoch_of(self, rank: int) -> int:
        """The epoch a rank is in: the latest it started (0 before the first)."""
        found = self.store.latest(self.id).get(rank)
        return found[0] if found is not None else 0

    # -- streams -------------------------------------------------------------------------

    def stream(
        self, ticket: IterationTicket, cancelled: Callable[[], bool] = lambda: False
    ) -> tuple[pa.Schema, Iterator[tuple[pa.RecordBatch, pa.Buffer]]]:
        """One rank's (or one worker's) messages, each with its ``BatchMetadata`` JSON.

        With transforms the first message is made before answering: its schema is the
        stream's.
        """
        world = self.setup.world(ticket.rank, ticket.worker, ticket.num_workers)
        epoch = ticket.epoch if ticket.epoch is not None else self.epoch_of(ticket.rank)
        plan = self.setup.epoch(epoch)
        schema = self.schema  # fail before streaming when the data is gone
        self.last_used = time.monotonic()
        self._end_cancelled(ticket.rank)
        try:
            handle = self.store.open_stream(
                self.id,
                epoch,
                ticket.rank,
                stream_key(ticket.worker, ticket.num_workers, ticket.session),
                self.setup.rank_size,
                self.spec.batch_size,
                takeover=ticket.takeover,
            )
        except StorageError as exc:  # another server may have the catalog: try there
            raise ServerUnavailable(f"this server cannot open the stream now: {exc}") from exc
        flow = self._flow(epoch, ticket.rank)
        with flow.cond:
            flow.held[handle] = RangeSet()
            if ticket.window:
                flow.windowed.add(handle)
        with self._lock:
            self._open[handle] = flow
        work = _StreamWork(self, handle, world, flow, ticket.window, cancelled)
        self._cancel_checks[handle] = cancelled
        batcher: Iterator[Message]
        if self.setup.plain:
            batcher = iter(PlainBatcher(plan, self.blocks, world, work, schema))
        else:
            batcher = iter(
                TransformedBatcher(
                    plan,
                    self.blocks,
                    world,
                    work,
                    self._filter,
                    self._process,
                    schema,
                    first_chunks=max(1, self.pool.workers if self.pool is not None else 1),
                    max_chunks=max(1, min(512, (1 << 16) // self.spec.batch_size)),
                )
            )
        messages = self._messages(batcher, work, handle, flow, ticket)
        if self.setup.plain:
            return schema, messages
        try:
            first = next(messages, None)
        except BaseException:
            messages.close()
            raise
        if first is None:
            return self.output_schema, iter(())
        return first[0].schema, itertools.chain([first], messages)

    def _end_cancelled(self, rank: int) -> None:
        """End the rank's streams here whose client is gone, before a new stream opens.

        Their own loops notice within ``WAIT_SECONDS``; a client resuming the rank at once
        (a new session: it does not take over other sessions' streams) must find what they
        held back in the queue already.
        """
        with self._lock:
            checks = list(self._cancel_checks.items())
        gone = [handle for handle, cancelled in checks if handle.rank == rank and cancelled()]
        if gone:
            self.store.end_streams(gone, orphan=True)

    def _messages(
        self,
        batcher: Iterator[Message],
        work: _StreamWork,
        handle: StreamHandle,
        flow: RankFlow,
        ticket: IterationTicket,
    ) -> Generator[tuple[pa.RecordBatch, pa.Buffer], None, None]:
        orphan = False  # the client went away mid-stream: any worker may take what it held
        finished = False  # it sent all its work
        try:
            for message in batcher:
                with flow.cond:
                    flow.filtered.update(message.filtered.ranges())
                    flow.failed.update(message.failed.ranges())
                    spans = [r for _, ranges in message.batches for r in ranges]
                    flow.went_out(handle, spans, message.batch.num_rows, message.batch.nbytes)
                    report = max(1, flow.window() // 3) if ticket.window else None
                metadata = BatchMetadata(
                    iteration_id=self.id,
                    rank=handle.rank,
                    epoch=handle.epoch,
                    batches=message.batches,
                    report_every=report,
                )
                fields = metadata.model_dump(exclude_none=True)
                if ticket.positions:
                    fields.update(
                        encode_positions(self.setup.epoch(handle.epoch).positions(message.seq))
                    )
                self.last_used = time.monotonic()
                with self._lock:
                    self.samples_sent += message.samples
                yield message.batch, pa.py_buffer(json.dumps(fields).encode())
            work.drain()
            finished = True
        except _Stopped as exc:
            if self.parked and not self.deleted:  # the client goes on through another server
                raise ServerUnavailable(
                    "this server is stopping: reconnect (to another server of the catalog)"
                ) from None
            if isinstance(exc, _Superseded):  # not the end of the work: the loop reopens
                raise ServerUnavailable(
                    f"another stream took this one's place in rank {handle.rank}: reconnect"
                ) from None
            return
        except _CatalogLost as exc:
            raise ServerUnavailable(f"this server lost the catalog mid-stream: {exc}") from None
        except GeneratorExit:  # gRPC dropped the stream: the client is gone
            log.debug("stream of rank %d: dropped by gRPC", handle.rank)
            orphan = True
            raise
        finally:
            with self._lock:
                self._open.pop(handle, None)
                idle = not self._open
            if idle:  # no stream reads now: the blocks kept for them can go
                self.blocks.clear()
            cancelled = self._cancel_checks.pop(handle, None)
            with flow.cond:
                flow.held.pop(handle, None)
                flow.sent.pop(handle, None)
                flow.windowed.discard(handle)
            if not self.deleted and not self.parked:
                try:
                    gone = orphan or (cancelled is not None and cancelled())
                    if finished and not gone:
                        self.store.finish_stream(handle)
                    else:
                        self.store.end_stream(handle, orphan=gone)
                except Exception as exc:  # deleted meanwhile, or the catalog is down
                    log.info("iteration %s: ending a stream of rank %d: %s",
                             self.id, handle.rank, exc)  # fmt: skip

    def _process(self, inputs: list[pa.RecordBatch]) -> list[Outcome]:
        """Collate and preprocess, in the worker pool when the work outweighs moving the data.

        The first batches run here and are timed; the pool is used from then on only when
        they took more than ``pool.min_row_seconds`` a row (sending a batch to a worker
        process and back costs about that much).
        """
        pipeline = self.setup.pipeline
        if self.pool is None or not pipeline.transforms_batches or not inputs:
            return [pipeline.process(batch) for batch in inputs]
        inline = pipeline.only_builtins and (
            self._row_cost is not None and self._row_cost < self.pool.min_row_seconds
        )
        if inline:  # ours, and cheaper here than the trip to a worker
            return [pipeline.process(batch) for batch in inputs]
        spec = json.dumps(self.setup.worker_spec())
        outcomes: list[Outcome] = []
        if self._row_cost is None:  # timed in a worker: user code never runs here
            first, seconds = self.pool.timed(spec, inputs[0])
            self._row_cost = seconds / max(1, inputs[0].num_rows)
            log.info(
                "iteration %s: preprocessing takes %.1f us a row: %s",
                self.id,
                self._row_cost * 1e6,
                "worker processes"
                if self._row_cost >= self.pool.min_row_seconds or not pipeline.only_builtins
                else "inline",
            )
            outcomes.append(first)
            inputs = inputs[1:]
        futures = [self.pool.submit(spec, batch) for batch in inputs]
        return [*outcomes, *(self.pool.outcome(future) for future in futures)]

    def _filter(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """``(keep, failed)`` masks: user filters in a worker process when there are workers."""
        pipeline = self.setup.pipeline
        if self.pool is None or all(step.plugin.builtin() for step in pipeline.filters):
            return pipeline.filter(batch)
        spec = json.dumps(self.setup.worker_spec())
        return self.pool.masks(self.pool.submit_filter(spec, batch))

    # -- what loops report ---------------------------------------------------------------

    def ack(self, body: AckBody) -> int:
        """Record what a rank's loop took and completed; saved before answering."""
        self.setup.world(body.rank)
        epoch = body.epoch if body.epoch is not None else self.epoch_of(body.rank)
        flow = self._flow(epoch, body.rank)
        with flow.ack_lock:
            with flow.cond:
                dropped = flow.dropped_in(body.completed)
            added, state = self.store.ack(
                self.id,
                epoch,
                body.rank,
                body.taken,
                body.completed,
                len(dropped[0]),
                len(dropped[1]),
            )
            with flow.cond:
                flow.forget(dropped)
                flow.learn(state)
        self.last_used = time.monotonic()
        return added

    def pushback(self) -> int:
        """Return every sample held by a stream to the queue of its rank; how many.

        Held means ahead of the loop, or taken by it and not completed.
        """
        latest = self.store.latest(self.id)
        count = self.store.pushback(self.id, {rank: epoch for rank, (epoch, _) in latest.items()})
        with self._lock:
            flows = list(self._flows.values())
        for flow in flows:
            with flow.cond:
                flow.stale = True
                flow.cond.notify_all()
        return count

    def park(self) -> None:
        """End every stream (the server is stopping or the iteration is being deleted)."""
        self.parked = True
        with self._lock:
            flows = list(self._flows.values())
        for flow in flows:
            with flow.cond:
                flow.cond.notify_all()

    # -- progress ------------------------------------------------------------------------

    def progress(self, ranks: bool = True) -> IterationProgress:
        """Where every rank stands in its current epoch (``ranks`` False: totals only)."""
        with self._lock:
            flows = dict(self._flows)
        rows = self.store.catalog.latest_rank_states(self.id)
        return iteration_progress(self.record, self.setup, rows, flows, ranks)

    def check_rank(self, rank: int) -> None:
        """Refuse a rank outside the iteration's world."""
        if not 0 <= rank < self.spec.world_size:
            raise InvalidArgument(
                f"rank {rank} is outside iteration {self.id}'s world of {self.spec.world_size}"
            )
