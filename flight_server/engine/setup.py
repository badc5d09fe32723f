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
from ...protocol.iterations import IterationPlan, IterationSpec
from ...transforms import Pipeline, Plugins
from ...transforms.pipeline import pipeline_spec
from ..memory import MemoryBudget
from ..reading import DatasetReader
from ..service import LavenderService
from .plan import EpochPlan
from .world import World, replication_partitions

__all__ = ["IterationSetup", "build_pipeline", "check_memory"]

PLANS_KEPT = 4


def build_pipeline(
    plugins: Plugins, spec: IterationSpec, uid_column: str, schema: pa.Schema | None = None
) -> Pipeline:
    """The transforms an iteration spec asks for, validated against the server's plugins.

    With ``schema`` (the rows the iteration reads), each plugin also checks its parameters
    against the columns (an expression naming an unknown column fails here).
    """
    return Pipeline.build(
        plugins,
        [(f.name, f.params) for f in spec.filters],
        (spec.collater.name, spec.collater.params) if spec.collater else None,
        [(p.name, p.params) for p in spec.preprocessors],
        spec.max_retry_count,
        spec.skip_on_failure,
        uid_column,
        schema=schema,
    )


def check_memory(spec: IterationSpec, reader: DatasetReader, memory: MemoryBudget) -> None:
    """Refuse an iteration whose largest block of shards cannot fit the memory budget.

    A block (``shuffle_block_size`` shards when shuffled, one shard in order) is what a
    stream needs in memory at once; it is estimated from the largest shards (their Parquet
    footers say their decoded size; other files count as their size on disk).

    Raises:
        InvalidArgument: the block does not fit, saying by how much and what to change.
    """
    count = spec.shuffle_block_size if spec.shuffle else 1
    largest = sorted(reader.main_shards, key=lambda s: s.size_bytes, reverse=True)[:count]
    need = sum(reader.decoded_bytes(shard) for shard in largest)
    if need <= memory.max_bytes:
        return
    what = f"{len(largest)} shards" if len(largest) > 1 else "one shard"
    fix = "a smaller shuffle_block_size, or " if len(largest) > 1 else ""
    raise InvalidArgument(
        f"a block of this iteration ({what}, about {need / (1 << 20):,.0f} MiB decoded) does "
        f"not fit the server's memory budget of {memory.max_bytes >> 20} MiB: ask for {fix}"
        "a server started with a larger --memory-mb (or write smaller shards)"
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
    _plans: OrderedDict[int, EpochPlan] = field(default_factory=OrderedDict, repr=False)
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
        dataset = service.get_dataset(dataset_id=spec.dataset_id)
        reader = service.reader(dataset, spec.shardsets, spec.columns, spec.join)
        partitions = replication_partitions(spec.world_size, spec.replication_pg)
        pipeline = build_pipeline(plugins, spec, dataset.uid_column_name, reader.schema)
        check_memory(spec, reader, service.memory)
        if plan is None:
            plan = IterationPlan(
                shards=[(shard.index, shard.num_rows) for shard in reader.main_shards], seed=seed
            )
        return cls(spec, plan, dataset, reader, pipeline, partitions)

    @property
    def num_partitions(self) -> int:
        """How many distinct partitions each epoch is cut into."""
        return len(set(self.partitions))

    @property
    def plain(self) -> bool:
        """Rows go out as read: no transform, and no inner join leaving samples out."""
        return self.pipeline.identity and self.spec.join == "left"

    def epoch(self, number: int) -> EpochPlan:
        """The plan of one epoch (the last few are kept)."""
        if self.spec.epochs is not None and number >= self.spec.epochs:
            raise InvalidArgument(
                f"the iteration makes {self.spec.epochs} epoch(s) (epochs={self.spec.epochs}); "
                f"epoch {number} is past its end: create a new iteration for more passes"
            )
        with self._lock:
            found = self._plans.get(number)
            if found is None:
                found = EpochPlan(
                    [rows for _, rows in self.plan.shards],
                    self.spec.batch_size,
                    partitions=self.num_partitions,
                    shuffle=self.spec.shuffle,
                    seed=self.plan.seed,
                    block_size=self.spec.shuffle_block_size,
                    drop_last=self.spec.drop_last,
                    epoch=number,
                )
                self._plans[number] = found
                while len(self._plans) > PLANS_KEPT:
                    self._plans.popitem(last=False)
            else:
                self._plans.move_to_end(number)
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
        )
