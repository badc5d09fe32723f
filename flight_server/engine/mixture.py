"""Mixtures: one iteration drawing from several datasets by weight, sample by sample.

``draws.MixtureOrder`` says which source each global seq of an epoch is drawn from and which
draw of that source it is; here those draws become rows. Each source is read as an
iteration over it alone would read it: its own ``BlockReader`` over its own ``EpochPlan``
(its shards, shuffled by a seed of its own), one plan per pass (``"cycle"`` reshuffles each
pass). ``MixtureBlocks.rows`` keeps the engine's contract (``rows(plan, seq) -> Rows``), so
the batchers, the claims and the acks are the ones of any iteration: a mixture is an order
of global seqs like any other, only drawn from several readers.

A source's own filters run here, on its rows as they are read (filtered rows are left out
as an inner join leaves rows out: counted as filtered); the iteration's collater and
preprocessors run on the mixed batches, as usual. ``source_column`` adds a string column
naming each row's source dataset.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ...protocol import Dataset
from ...protocol.errors import InvalidArgument, SchemaMismatch
from ...protocol.iterations import IterationSpec, MixtureSourceSpec
from ...transforms import Pipeline, Plugins
from ...transforms.pipeline import pipeline_spec
from ..memory import MemoryBudget
from ..pool import TransformPool
from ..read_pool import ReadPool
from ..reading import DatasetReader
from ..service import LavenderService
from .blocks import BlockReader, Kept, Rows, joined_masks
from .draws import MixtureOrder, epoch_key
from .plan import ORDER_VERSION, EpochPlan

__all__ = ["Mixture", "MixtureBlocks", "MixturePlan", "SourceSetup", "build_sources"]

PASS_STRIDE = 1 << 32
"""A source plan's ``epoch`` is ``epoch * PASS_STRIDE + pass``: unique per mixture epoch and
pass, so block caches and seeds of different passes never meet."""
PLANS_KEPT = 16

Filter = Callable[[pa.RecordBatch], tuple[np.ndarray, np.ndarray]]


@dataclass
class SourceSetup:
    """One source of a mixture: its dataset, reader, filters and frozen main shards."""

    index: int
    spec: MixtureSourceSpec
    dataset: Dataset
    reader: DatasetReader
    pipeline: Pipeline
    """Its own filters (with the iteration's retry and skip policy)."""
    shards: list[tuple[int, int]]

    @property
    def size(self) -> int:
        """Samples per pass."""
        return sum(rows for _, rows in self.shards)

    @property
    def label(self) -> str:
        """How messages name it: ``mixture source 1 (dataset 'web')``."""
        return f"mixture source {self.index} (dataset {self.dataset.name!r})"


def _check_columns(sources: list[SourceSetup]) -> pa.Schema:
    """The columns every source gives, which must agree (one clear error naming which)."""
    first = sources[0]
    schema = first.reader.schema
    for source in sources[1:]:
        other = source.reader.schema
        for field in schema:
            if field.name not in other.names:
                raise SchemaMismatch(
                    f"{source.label} has no column {field.name!r} that {first.label} has: "
                    "the sources of a mixture give the same columns (choose them with "
                    "columns=[...] on each source)"
                )
            kind = other.field(field.name).type
            if not kind.equals(field.type):
                raise SchemaMismatch(
                    f"column {field.name!r} of {source.label} is {kind}, of {first.label} "
                    f"{field.type}: the sources of a mixture give the same column types"
                )
        extra = [name for name in other.names if name not in schema.names]
        if extra:
            raise SchemaMismatch(
                f"{source.label} has column {extra[0]!r} that {first.label} lacks: the "
                "sources of a mixture give the same columns (choose them with columns=[...] "
                "on each source)"
            )
    return schema


def build_sources(
    spec: IterationSpec,
    service: LavenderService,
    plugins: Plugins,
    frozen: Sequence[Sequence[tuple[int, int]]] | None,
) -> tuple[list[SourceSetup], pa.Schema]:
    """The sources of a mixture spec, checked, and the schema of the rows it reads.

    ``frozen``: the main shards each source froze when the iteration was created (None: a
    new iteration freezes them now).

    Raises:
        InvalidArgument: a source, its columns, filters or weights are wrong (naming it).
    """
    assert spec.mixture is not None
    if spec.shardsets is not None or spec.columns is not None:
        raise InvalidArgument(
            "a mixture chooses shardsets and columns per source (MixtureSource(shardsets=..., "
            "columns=...)), not for the whole iteration"
        )
    ids = [s.dataset_id for s in spec.mixture]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise InvalidArgument(
            f"dataset {twice[0]!r} is a source of the mixture twice: each source is a "
            "different dataset (weights are set by dataset id)"
        )
    if spec.mixture[0].dataset_id != spec.dataset_id:
        raise InvalidArgument("a mixture's dataset_id is its first source's")
    if not any(s.weight > 0 for s in spec.mixture):
        raise InvalidArgument("mixture weights are all 0: give at least one source a weight > 0")
    if frozen is not None and len(frozen) != len(spec.mixture):
        raise InvalidArgument("the iteration's plan does not match its mixture")
    sources: list[SourceSetup] = []
    for index, source in enumerate(spec.mixture):
        dataset = service.get_dataset(dataset_id=source.dataset_id)
        label = f"mixture source {index} (dataset {dataset.name!r})"
        try:
            reader = service.reader(dataset, source.shardsets, source.columns, spec.join)
        except InvalidArgument as exc:
            raise type(exc)(f"{label}: {exc}") from None
        pipeline = Pipeline.build(
            plugins,
            [(f.name, f.params) for f in source.filters],
            None,
            [],
            spec.max_retry_count,
            spec.skip_on_failure,
            dataset.uid_column_name,
            schema=reader.schema,
        )
        shards = (
            [(int(i), int(n)) for i, n in frozen[index]]
            if frozen is not None
            else [(shard.index, shard.num_rows) for shard in reader.main_shards]
        )
        found = SourceSetup(index, source, dataset, reader, pipeline, shards)
        if found.size == 0:
            raise InvalidArgument(f"{label} has no samples: a mixture draws from each source")
        sources.append(found)
    schema = _check_columns(sources)
    if spec.source_column is not None:
        if spec.source_column in schema.names:
            raise InvalidArgument(
                f"source_column {spec.source_column!r} is a column of the data already; "
                "choose another name"
            )
        schema = schema.append(pa.field(spec.source_column, pa.string()))
    return sources, schema


def source_filter(pipeline: Pipeline, pool: TransformPool | None) -> Filter | None:
    """A source's filters as ``(keep, failed)`` masks: user code in a worker process."""
    if not pipeline.filters:
        return None
    if pool is None or all(step.plugin.builtin() for step in pipeline.filters):
        return pipeline.filter
    spec = json.dumps(
        pipeline_spec(
            [(s.name, s.params) for s in pipeline.filters],
            None,
            [],
            pipeline.max_retry_count,
            pipeline.skip_on_failure,
            pipeline.uid_column,
        )
    )
    return lambda batch: pool.masks(pool.submit_filter(spec, batch))


class Mixture:
    """A mixture's sources and their own orders: what turns draws into source samples.

    Needs only the stored record (the spec, and the main shards each source froze), so
    progress of a mixture no stream reads here builds no reader.
    """

    def __init__(
        self,
        spec: IterationSpec,
        shards: Sequence[Sequence[tuple[int, int]]],
        seed: int,
        order_version: int = ORDER_VERSION,
    ) -> None:
        assert spec.mixture is not None
        self.spec = spec
        self.seed = seed
        self.order_version = order_version
        self.shards = [[(int(i), int(n)) for i, n in found] for found in shards]
        self.sizes = [sum(n for _, n in found) for found in self.shards]
        self.initial = tuple(float(s.weight) for s in spec.mixture)
        self.ids = [s.dataset_id for s in spec.mixture]
        self._plans: OrderedDict[tuple[int, int, int], EpochPlan] = OrderedDict()
        self._orders: OrderedDict[tuple[int, tuple[Any, ...]], MixtureOrder] = OrderedDict()
        self._lock = threading.Lock()

    def order(
        self, epoch: int, schedule: Sequence[tuple[int, Sequence[float]]], version: int = 0
    ) -> MixtureOrder:
        """The draws of one epoch under a schedule.

        The same object for the same schedule: its scan is paid once.
        """
        key = (epoch, tuple((int(s), tuple(float(w) for w in ws)) for s, ws in schedule))
        with self._lock:
            found = self._orders.get(key)
            if found is None:
                found = MixtureOrder(
                    self.sizes, schedule, self.spec.on_exhausted, epoch_key(self.seed, epoch),
                    version,
                )  # fmt: skip
                self._orders[key] = found
                while len(self._orders) > PLANS_KEPT:
                    self._orders.popitem(last=False)
            return found

    def source_plan(self, source: int, epoch: int, passed: int) -> EpochPlan:
        """A source's own order in one pass of one epoch (its own seed)."""
        key = (source, epoch, passed)
        with self._lock:
            plan = self._plans.get(key)
            if plan is None:
                plan = EpochPlan(
                    [rows for _, rows in self.shards[source]],
                    1,
                    shuffle=self.spec.shuffle,
                    seed=int(epoch_key(self.seed, source) >> 1),
                    block_size=self.spec.shuffle_block_size,
                    epoch=epoch * PASS_STRIDE + passed,
                    order_version=self.order_version,
                )
                self._plans[key] = plan
                while len(self._plans) > PLANS_KEPT:
                    self._plans.popitem(last=False)
            else:
                self._plans.move_to_end(key)
            return plan

    def split(
        self, order: MixtureOrder, seq: np.ndarray
    ) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """Ascending seqs by source and pass: ``(source, pass, where in seq, source seqs)``.

        A source's seqs come out ascending (its draws are numbered in seq order).
        """
        source, draw = order.locate(seq)
        parts = []
        for s in np.unique(source).tolist():
            where = np.flatnonzero(source == s)
            passes, inner = np.divmod(draw[where], self.sizes[s])
            for p in np.unique(passes).tolist():
                mask = passes == p
                parts.append((int(s), int(p), where[mask], inner[mask]))
        return parts


class MixturePlan(EpochPlan):
    """An epoch of a mixture: the chunk and deal arithmetic of ``EpochPlan`` over its draws.

    Its length is the order's ``total``; ``retarget`` swaps the order in place when the
    weights change (the seqs handed out before the change map the same under both).
    """

    def __init__(
        self,
        mixture: Mixture,
        order: MixtureOrder,
        batch_size: int,
        partitions: int,
        drop_last: bool,
        epoch: int,
    ) -> None:
        super().__init__([order.total], batch_size, partitions, drop_last=drop_last, epoch=epoch)
        self.mixture = mixture
        self.order = order

    def retarget(self, order: MixtureOrder) -> None:
        """Use new draws (new weights): the epoch's length follows them."""
        available = order.total
        if self.drop_last:
            per_round = self.batch_size * self.partitions
            self.total = available // per_round * per_round
        else:
            self.total = available
        self.shard_rows = [available]
        self.shard_starts = np.array([0, available], dtype=np.int64)
        self.available = available
        self.order = order

    def positions(self, seq: np.ndarray) -> np.ndarray:
        """Positions of the rows in their own source dataset (``sources`` says which)."""
        seq = np.asarray(seq, dtype=np.int64)
        out = np.empty(len(seq), dtype=np.int64)
        for s, p, where, inner in self.mixture.split(self.order, seq):
            out[where] = self.mixture.source_plan(s, self.epoch, p).positions(inner)
        return out

    def sources(self, seq: np.ndarray) -> np.ndarray:
        """The source of each seq."""
        return self.order.locate(np.asarray(seq, dtype=np.int64))[0]


class MixtureBlocks(BlockReader):
    """Rows of a mixture's seqs: each source's rows through its own block reader.

    Keeps ``BlockReader``'s contract (``rows(plan, seq)``, ``clear()``) for the batchers;
    its own cache is unused (the sources' readers keep their blocks).
    """

    def __init__(
        self,
        mixture: Mixture,
        sources: Sequence[SourceSetup],
        schema: pa.Schema,
        filters: Sequence[Filter | None],
        retries: int,
        skip: bool,
        pool: ReadPool,
        memory: MemoryBudget | None = None,
        iteration_id: str = "",
        filter: Filter | None = None,
        read_ahead_bytes: int = 0,
    ) -> None:
        first = sources[0]
        # the iteration's own filters run on the mixed rows (``kept``), not per source block
        super().__init__(
            first.reader, first.shards, retries, skip, pool, memory,
            iteration_id=iteration_id, read_ahead_bytes=read_ahead_bytes,
        )  # fmt: skip
        self.mixture = mixture
        self.schema = schema
        self.filters = list(filters)
        self.mixed_filter = filter
        self.readers = [
            BlockReader(s.reader, s.shards, retries, skip, pool, memory,
                        iteration_id=iteration_id)
            for s in sources
        ]  # fmt: skip
        column = mixture.spec.source_column
        self._data = pa.schema([f for f in schema if f.name != column])
        self._names = pa.array(mixture.ids, pa.string())

    def boundary(self, plan: EpochPlan, seq: int) -> int:
        """A mixture's rows come from several readers: every batch is cut afresh."""
        return plan.total

    def kept(
        self, plan: EpochPlan, seq: np.ndarray, check: Callable[[], None] | None = None
    ) -> Kept:
        """What the iteration's own filters leave of a mixture's rows (sources' filters ran)."""
        rows = self.rows(plan, seq, check)
        failed = (
            np.zeros(len(seq), dtype=bool) if rows.unreadable is None else rows.unreadable.copy()
        )
        keep = ~failed if rows.absent is None else ~failed & ~rows.absent
        mixed = self.mixed_filter
        if mixed is not None and keep.any():
            where = np.flatnonzero(keep)
            picked = rows.table if keep.all() else rows.table.filter(pa.array(keep))
            batches = picked.combine_chunks().to_batches()
            ok, bad = mixed(batches[0])
            keep[where] = ok & ~bad
            failed[where[bad]] = True
        table = rows.table if keep.all() else rows.table.filter(pa.array(keep))
        return Kept(table, keep, failed)

    def rows(
        self, plan: EpochPlan, seq: np.ndarray, check: Callable[[], None] | None = None
    ) -> Rows:
        """Rows for ascending seqs of a mixture epoch, in that order.

        ``check``: as a ``BlockReader``'s (passed on to the sources' readers).
        """
        if not isinstance(plan, MixturePlan):
            raise TypeError("MixtureBlocks reads MixturePlan epochs")
        seq = np.asarray(seq, dtype=np.int64)
        if not len(seq):
            return Rows(self.schema.empty_table())
        pieces: list[Rows] = []
        places: list[np.ndarray] = []
        for s, p, where, inner in self.mixture.split(plan.order, seq):
            rows = self.readers[s].rows(self.mixture.source_plan(s, plan.epoch, p), inner, check)
            pieces.append(self._conform(s, rows))
            places.append(where)
        joined = Rows.concat(pieces)
        place = np.concatenate(places)
        if len(pieces) == 1 and bool((np.diff(place) == 1).all()):
            return joined
        return joined.take(np.argsort(place, kind="stable"), contiguous=False)

    def _conform(self, source: int, rows: Rows) -> Rows:
        """A source's rows with the mixture's columns, filtered, marked with their source."""
        table = rows.table
        if not table.schema.equals(self._data):
            table = table.select(self._data.names).cast(self._data)
        unreadable, absent = rows.unreadable, rows.absent
        check = self.filters[source]
        if check is not None and table.num_rows:
            candidates = np.ones(table.num_rows, dtype=bool)
            for mask in (unreadable, absent):
                if mask is not None:
                    candidates &= ~mask
            if candidates.any():
                picked = table if candidates.all() else table.filter(pa.array(candidates))
                batches = picked.combine_chunks().to_batches()
                keep, failed = check(batches[0]) if batches else (np.ones(0, bool),) * 2
                dropped = np.zeros(table.num_rows, dtype=bool)
                lost = np.zeros(table.num_rows, dtype=bool)
                dropped[candidates] = ~keep & ~failed
                lost[candidates] = failed
                absent = dropped if absent is None else absent | dropped
                unreadable = lost if unreadable is None else unreadable | lost
        column = self.mixture.spec.source_column
        if column is not None:
            names = self._names.take(pa.array(np.full(table.num_rows, source, dtype=np.int32)))
            table = table.append_column(pa.field(column, pa.string()), names)
        return Rows(
            table,
            joined_masks([unreadable], [table.num_rows]),
            joined_masks([absent], [table.num_rows]),
        )

    def clear(self) -> None:
        """Drop every kept block of every source."""
        for reader in self.readers:
            reader.clear()
