"""``IterationSetup``: everything an iteration derives from its stored spec, built once.

The reader of its shardsets and columns, its transforms (validated against the server's
plugins), the partition each rank reads, and the plan of each epoch. The manager builds
one when an iteration is created (checking the spec) and hands it to the live iteration,
so nothing is derived twice.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ...protocol import Dataset
from ...protocol.errors import InvalidArgument
from ...protocol.iterations import SAMPLE_GROUP, IterationPlan, IterationSpec
from ...transforms import Pipeline, Plugins
from ...transforms.pipeline import pipeline_spec
from ..reading import DatasetReader
from ..service import LavenderService
from .mixture import Mixture, MixturePlan, SourceSetup, build_sources
from .plan import EpochPlan
from .world import World, replication_partitions

__all__ = ["IterationSetup", "build_pipeline"]

PLANS_KEPT = 4


def build_pipeline(
    plugins: Plugins, spec: IterationSpec, uid_column: str, schema: pa.Schema | None = None
) -> Pipeline:
    """The transforms an iteration spec asks for, validated against the server's plugins.

    With ``schema`` (the rows the iteration reads), each plugin also checks its parameters
    against the columns (an expression naming an unknown column fails here).
    """
    if spec.categorizer is not None and spec.batch_size == 0:
        raise InvalidArgument(
            "a categorizer makes batches of one category: give batch_size >= 1 (batch_size 0 "
            "delivers single samples)"
        )
    return Pipeline.build(
        plugins,
        [(f.name, f.params) for f in spec.filters],
        (spec.collater.name, spec.collater.params) if spec.collater else None,
        [(p.name, p.params) for p in spec.preprocessors],
        spec.max_retry_count,
        spec.skip_on_failure,
        uid_column,
        schema=schema,
        categorizer=(spec.categorizer.name, spec.categorizer.params) if spec.categorizer else None,
    )


@dataclass
class IterationSetup:
    """An iteration's reader, transforms, partitions and epoch plans (see module doc)."""

    spec: IterationSpec
    plan: IterationPlan
    dataset: Dataset
    reader: DatasetReader
    pipeline: Pipeline
    partitions: list[int]
    """The partition of the epoch each rank reads (ranks of a replication group share one)."""
    asked: IterationSpec | None = None
    """The spec as stored (``spec`` has ``batch_size`` 0 replaced by ``SAMPLE_GROUP``)."""
    sources: list[SourceSetup] = field(default_factory=list)
    """A mixture's sources (empty otherwise)."""
    mixture: Mixture | None = None
    read_schema: pa.Schema | None = None
    """The rows read (a mixture's: its sources' columns, and the source column)."""
    _plans: OrderedDict[tuple[int, int], EpochPlan] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def build(
        cls,
        spec: IterationSpec,
        service: LavenderService,
        plugins: Plugins,
        plan: IterationPlan | None = None,
        seed: int = 0,
    ) -> IterationSetup:
        """Check a spec against the dataset and the plugins, and derive everything from it.

        Without ``plan`` (a new iteration), the main shards are frozen as they are now and
        ``seed`` is the shuffle seed.

        Raises:
            InvalidArgument: a shardset, column, plugin or parameter the spec names is wrong.
        """
        asked = spec
        if spec.batch_size == 0:  # single samples travel and are acknowledged in groups
            spec = spec.model_copy(update={"batch_size": SAMPLE_GROUP})
        partitions = replication_partitions(spec.world_size, spec.replication_pg)
        if spec.mixture is not None:
            sources, schema = build_sources(
                spec, service, plugins, plan.sources if plan is not None else None
            )
            dataset, reader = sources[0].dataset, sources[0].reader
            pipeline = build_pipeline(plugins, asked, dataset.uid_column_name, schema)
            if plan is None:
                plan = IterationPlan(shards=[], seed=seed, sources=[s.shards for s in sources])
            mixture = Mixture(sources, spec, plan.seed)
            return cls(spec, plan, dataset, reader, pipeline, partitions, asked, sources,
                       mixture, schema)  # fmt: skip
        dataset = service.get_dataset(dataset_id=spec.dataset_id)
        reader = service.reader(dataset, spec.shardsets, spec.columns, spec.join)
        pipeline = build_pipeline(plugins, asked, dataset.uid_column_name, reader.schema)
        if plan is None:
            plan = IterationPlan(
                shards=[(shard.index, shard.num_rows) for shard in reader.main_shards], seed=seed
            )
        return cls(spec, plan, dataset, reader, pipeline, partitions, asked)

    @property
    def schema(self) -> pa.Schema:
        """The schema of the rows read (before transforms)."""
        return self.read_schema if self.read_schema is not None else self.reader.schema

    @property
    def num_partitions(self) -> int:
        """How many distinct partitions each epoch is cut into."""
        return len(set(self.partitions))

    @property
    def plain(self) -> bool:
        """Rows go out as read: no transform, and no inner join leaving samples out."""
        return (
            self.pipeline.identity
            and self.spec.join == "left"
            and self.spec.categorizer is None
            and not any(s.pipeline.filters for s in self.sources)
        )

    def epoch(self, number: int, partitions: int | None = None) -> EpochPlan:
        """The plan of one epoch (the last few are kept), over ``partitions`` if given.

        A mixture's is a ``MixturePlan`` with the spec's weights (``changes`` applies live
        weights to it).
        """
        if self.spec.epochs is not None and number >= self.spec.epochs:
            raise InvalidArgument(
                f"the iteration makes {self.spec.epochs} epoch(s) (epochs={self.spec.epochs}); "
                f"epoch {number} is past its end: create a new iteration for more passes"
            )
        parts = partitions if partitions is not None else self.num_partitions
        with self._lock:
            found = self._plans.get((number, parts))
            if found is None:
                if self.mixture is not None:
                    found = MixturePlan(
                        self.mixture,
                        self.mixture.order(number, [(0, self.mixture.initial)]),
                        self.spec.batch_size,
                        parts,
                        self.spec.drop_last,
                        number,
                    )
                else:
                    found = EpochPlan(
                        [rows for _, rows in self.plan.shards],
                        self.spec.batch_size,
                        partitions=parts,
                        shuffle=self.spec.shuffle,
                        seed=self.plan.seed,
                        block_size=self.spec.shuffle_block_size,
                        drop_last=self.spec.drop_last,
                        epoch=number,
                    )
                self._plans[(number, parts)] = found
                while len(self._plans) > PLANS_KEPT:
                    self._plans.popitem(last=False)
            else:
                self._plans.move_to_end((number, parts))
            return found

    @property
    def total(self) -> int:
        """Samples per epoch, every rank together."""
        return self.epoch(0).total

    def rank_size(self, rank: int) -> int:
        """Samples one rank delivers in an epoch (the same in every epoch)."""
        return self.epoch(0).partition_size(self.partitions[rank])

    def world(self, rank: int, worker: int = 0, num_workers: int = 1) -> World:
        """Where one stream sits."""
        if not 0 <= rank < self.spec.world_size:
            raise InvalidArgument(
                f"rank {rank} is outside the iteration's world of {self.spec.world_size}"
            )
        return World(
            rank=rank,
            world_size=self.spec.world_size,
            replication_pg=(
                tuple(tuple(g) for g in self.spec.replication_pg)
                if self.spec.replication_pg
                else None
            ),
            worker=worker,
            num_workers=num_workers,
        )

    def worker_spec(self) -> dict[str, Any]:
        """The JSON-able pipeline a preprocessing worker process rebuilds."""
        p = self.pipeline
        return pipeline_spec(
            [(s.name, s.params) for s in p.filters],
            (p.collater.name, p.collater.params) if p.collater else None,
            [(s.name, s.params) for s in p.preprocessors],
            p.max_retry_count,
            p.skip_on_failure,
            p.uid_column,
            (p.categorizer.name, p.categorizer.params) if p.categorizer else None,
        )
