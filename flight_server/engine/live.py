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

import numpy as np
import pyarrow as pa

from ...catalog import VersionChanged
from ...protocol.errors import InvalidArgument, ServerUnavailable, StorageError
from ...protocol.iterations import (
    AckBody,
    IterationInfo,
    IterationProgress,
    IterationRecord,
    IterationTicket,
    WeightsSet,
    batch_metadata_json,
    encode_positions,
)
from ...protocol.ranges import RangeSet
from ...transforms import Outcome
from ..memory import MemoryBudget
from ..pool import TransformPool
from ..read_pool import ReadPool
from . import adjust
from .batching import Message, PlainBatcher, TransformedBatcher
from .blocks import BlockReader
from .categorized import CategorizedBatcher
from .changes import Changes, EpochViews
from .flow import RankFlow, ReadAhead
from .mixture import MixtureBlocks, source_filter
from .plan import EpochPlan
from .progress import iteration_progress
from .setup import IterationSetup
from .state import stream_key
from .store import ProgressStore, StreamHandle
from .work import CatalogLost, Stopped, StreamWork, Superseded

__all__ = ["LiveIteration"]

log = logging.getLogger(__name__)


class LiveIteration:
    """One iteration this server serves; see the module docstring.

    Args:
        record: the iteration as stored.
        setup: what the manager derived from it (built once).
        store: the iteration state in the catalog.
        reads: the server's read pool (shard reads by store, block gathers).
        pool: preprocessing worker processes (None: preprocess in this process).
        budget: the read-ahead budget of windowed streams.
        memory: the server's memory budget (kept blocks and read-ahead reserved in it).
    """

    def __init__(
        self,
        record: IterationRecord,
        setup: IterationSetup,
        store: ProgressStore,
        reads: ReadPool,
        pool: TransformPool | None = None,
        budget: ReadAhead | None = None,
        memory: MemoryBudget | None = None,
    ) -> None:
        self.record = record
        self.id = record.id
        self.spec = setup.spec  # batch_size 0 is SAMPLE_GROUP here; record.spec as asked
        self.setup = setup
        self.store = store
        self.pool = pool
        self.budget = budget or ReadAhead()
        self.views = EpochViews(setup)
        self._refreshed = False
        filters = self._filter if setup.pipeline.filters else None
        if setup.mixture is not None:
            self.blocks: BlockReader = MixtureBlocks(
                setup.mixture,
                setup.sources,
                setup.schema,
                [source_filter(s.pipeline, pool) for s in setup.sources],
                setup.spec.max_retry_count,
                setup.spec.skip_on_failure,
                reads,
                memory,
                iteration_id=record.id,
                filter=filters,
                read_ahead_bytes=self.budget.max_bytes,
            )
        else:
            self.blocks = BlockReader(
                setup.reader,
                setup.plan.shards,
                setup.spec.max_retry_count,
                setup.spec.skip_on_failure,
                reads,
                memory,
                iteration_id=record.id,
                filter=filters,
                read_ahead_bytes=self.budget.max_bytes,
            )
        self.parked = False
        self.deleted = False
        self.sent = 0
        """Samples this server's streams sent (for the nodes' samples/s)."""
        self.last_used = time.monotonic()
        self._flows: dict[tuple[int, int, int], RankFlow] = {}
        """By epoch, rank and deal (a deal's local seqs are not another's)."""
        self._open: dict[StreamHandle, RankFlow] = {}
        self._cancel_checks: dict[StreamHandle, Callable[[], bool]] = {}
        self._lock = threading.Lock()
        self._row_cost: float | None = None
        self._output_schema: pa.Schema | None = None

    # -- what it is ----------------------------------------------------------------------

    @property
    def schema(self) -> pa.Schema:
        """The schema of the rows read (before transforms)."""
        return self.setup.schema

    def refresh(self) -> None:
        """Load the iteration's changes (weights, deals) from the catalog."""
        version, records = self.store.catalog.load_changes(self.id)
        if version != self.views.version or not self._refreshed:
            self.views.update(Changes.from_records(version, records))
        self._refreshed = True

    def _fresh_views(self) -> EpochViews:
        if not self._refreshed:
            self.refresh()
        return self.views

    def just_created(self) -> None:
        """The iteration was created a moment ago: its views are the catalog's already.

        A new iteration has no changes (weights, deals) to load.
        """
        self._refreshed = True

    @property
    def world_size(self) -> int:
        """The ranks the iteration has now (another than the spec's after a resize)."""
        self.refresh()  # a resize may have been made through another server
        return self.views.world_now

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

    def info(self, world_size: int, created: bool = False) -> IterationInfo:
        """What a FlightInfo says of the iteration (``created``: to the call that made it)."""
        return IterationInfo(
            iteration_id=self.id,
            spec=self.record.spec,
            seed=self.setup.plan.seed,
            total=self.setup.total,
            world_size=world_size,
            created=created,
        )

    @property
    def open_streams(self) -> list[StreamHandle]:
        """The streams this server is sending now."""
        with self._lock:
            return list(self._open)

    def _flow(self, epoch: int, rank: int, deal: int = 0) -> RankFlow:
        with self._lock:
            flow = self._flows.get((epoch, rank, deal))
            if flow is None:
                flow = RankFlow(self.spec.batch_size, self.budget)
                self._flows[(epoch, rank, deal)] = flow
            return flow

    def warm(self) -> None:
        """Start reading the first block of the first epoch (a new iteration's first batch).

        Its loop asks for its stream a round trip later; the read, and for a shuffled
        iteration the block's order and first piece, are under way by then. Mixtures read
        their sources' blocks as their draws come.
        """
        if self.setup.mixture is not None:
            return
        try:
            plan = self._fresh_views().plan(0)
            self.blocks.prefetch(plan, 0, urgent=True)
        except Exception as exc:  # its stream will meet (and report) the same trouble
            log.debug("iteration %s: no early read: %s", self.id, exc)

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
        self.refresh()  # one query per stream: its world and plans are the latest
        views = self.views
        epoch = ticket.epoch if ticket.epoch is not None else self.epoch_of(ticket.rank)
        schema = self.schema  # fail before streaming when the data is gone
        self.last_used = time.monotonic()
        self._end_cancelled(ticket.rank)
        while True:
            world = views.world(
                epoch, ticket.rank, ticket.worker, ticket.num_workers, ticket.worker_chunks
            )
            plan = views.plan(epoch)
            try:
                handle = self.store.open_stream(
                    self.id,
                    epoch,
                    ticket.rank,
                    stream_key(ticket.worker, ticket.num_workers, ticket.session),
                    lambda rank: views.rank_size(epoch, rank),
                    self.spec.batch_size,
                    version=views.version,
                    deal=views.deal_number(epoch),
                    takeover=ticket.takeover,
                )
                break
            except VersionChanged:  # changed through another server: look again
                self.refresh()
            except StorageError as exc:  # another server may have the catalog: try there
                raise ServerUnavailable(f"this server cannot open the stream now: {exc}") from exc
        flow = self._flow(epoch, ticket.rank, handle.deal)
        with flow.cond:
            flow.held[handle] = RangeSet()
            if ticket.window:
                flow.windowed.add(handle)
        with self._lock:
            self._open[handle] = flow
        work = StreamWork(self, handle, world, flow, ticket.window, cancelled)
        self._cancel_checks[handle] = cancelled
        batcher: Iterator[Message]
        if self.setup.plain:
            batcher = iter(PlainBatcher(plan, self.blocks, world, work, schema))
        elif self.setup.pipeline.categorizer is not None:
            batcher = iter(
                CategorizedBatcher(
                    plan,
                    self.blocks,
                    world,
                    work,
                    self._categorize,
                    self._process,
                    schema,
                    first_chunks=max(1, self.pool.workers if self.pool is not None else 1),
                    max_chunks=max(1, min(512, (1 << 16) // self.spec.batch_size)),
                )
            )
        else:
            batcher = iter(
                TransformedBatcher(
                    plan,
                    self.blocks,
                    world,
                    work,
                    self._process if self.setup.pipeline.transforms_batches else None,
                    schema,
                    first_chunks=max(1, self.pool.workers if self.pool is not None else 1),
                    max_chunks=max(1, min(512, (1 << 16) // self.spec.batch_size)),
                    # with worker processes a message would go to one worker: ours only
                    rowwise=self.setup.pipeline.rowwise
                    and (self.pool is None or self.setup.pipeline.only_builtins),
                )
            )
        messages = self._messages(batcher, work, handle, flow, ticket, plan)
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
        work: StreamWork,
        handle: StreamHandle,
        flow: RankFlow,
        ticket: IterationTicket,
        plan: EpochPlan,
    ) -> Generator[tuple[pa.RecordBatch, pa.Buffer], None, None]:
        orphan = False  # the client went away mid-stream: any worker may take what it held
        finished = False  # it sent all its work
        try:
            for message in batcher:
                with flow.cond:
                    flow.filtered.add(message.filtered)
                    flow.failed.add(message.failed)
                    spans = [r for _, ranges in message.batches for r in ranges]
                    flow.went_out(handle, spans, message.batch.num_rows, message.batch.nbytes)
                    report = max(1, flow.window() // 3) if ticket.window else None
                    if report is not None and message.final:
                        report = 1  # the stream ends when its loop took it all: say so at once
                metadata = batch_metadata_json(
                    self.id,
                    handle.rank,
                    handle.epoch,
                    message.batches,
                    deal=handle.deal or None,
                    report_every=report,
                    extra=encode_positions(plan.positions(message.seq))
                    if ticket.positions
                    else None,
                )
                self.last_used = time.monotonic()
                self.sent += message.batch.num_rows
                yield message.batch, pa.py_buffer(metadata)
            work.drain()
            finished = True
        except Stopped as exc:
            if self.parked and not self.deleted:  # the client goes on through another server
                raise ServerUnavailable(
                    "this server is stopping: reconnect (to another server of the catalog)"
                ) from None
            if isinstance(exc, Superseded):  # not the end of the work: the loop reopens
                raise ServerUnavailable(
                    f"another stream took this one's place in rank {handle.rank}: reconnect"
                ) from None
            return
        except CatalogLost as exc:
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

    def _categorize(self, batch: pa.RecordBatch) -> tuple[pa.Array, np.ndarray]:
        """``(categories, failed)``: a user categorizer in a worker process when there are."""
        pipeline = self.setup.pipeline
        step = pipeline.categorizer
        if self.pool is None or step is None or step.plugin.builtin():
            return pipeline.categorize(batch)
        spec = json.dumps(self.setup.worker_spec())
        return self.pool.masks(self.pool.submit_categorize(spec, batch))

    # -- changes -------------------------------------------------------------------------

    def set_mixture_weights(self, weights: dict[str, float], at: int | None = None) -> WeightsSet:
        """New weights of a mixture's sources, for every rank (see ``adjust``)."""
        return adjust.set_weights(self, weights, at)

    def resize(self, world_size: int, dead_nodes: list[str] | None = None) -> bool:
        """Deal what is not completed to ``world_size`` ranks (see ``adjust``)."""
        return adjust.resize(self, world_size, dead_nodes or ())

    # -- what loops report ---------------------------------------------------------------

    def ack(self, body: AckBody) -> int:
        """Record what a rank's loop took and completed; saved before answering."""
        self.check_rank(body.rank)
        epoch = body.epoch if body.epoch is not None else self.epoch_of(body.rank)
        deal = body.deal if body.deal is not None else self.views.deal_number(epoch)
        flow = self._flow(epoch, body.rank, deal)
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
                deal=body.deal,
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
        self.refresh()
        with self._lock:
            flows = dict(self._flows)
        rows = self.store.catalog.latest_rank_states(self.id)
        return iteration_progress(self.record, self.views, rows, flows, ranks)

    def check_rank(self, rank: int) -> None:
        """Refuse a rank outside the iteration's world."""
        world = self._fresh_views().world_now
        if not 0 <= rank < world:  # perhaps resized through another server: look again
            world = self.world_size
        if not 0 <= rank < world:
            raise InvalidArgument(f"rank {rank} is outside iteration {self.id}'s world of {world}")
