"""``IterationSetup``: everything an iteration derives from its stored spec, built once.

The reader of its shardsets and columns (a mixture: one per source, with the source's own
filters), its transforms (validated against the server's plugins), and its ``Plans`` (the
partition each rank reads, the plan of each epoch). The manager builds one when an
iteration is created (checking the spec) and hands it to the live iteration, so nothing is
derived twice.
"""

from __future__ import annotations

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
from .mixture import SourceSetup, build_sources
from .plan import ORDER_VERSION
from .plans import Plans
from .world import replication_partitions

__all__ = ["IterationSetup", "build_pipeline", "check_memory"]


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


def check_memory(spec: IterationSpec, reader: DatasetReader, memory: MemoryBudget) -> float | None:
    """Refuse an iteration whose largest block of shards cannot fit the memory budget.

    A block (``shuffle_block_size`` shards when shuffled, one shard in order) is what a
    stream needs in memory at once; it is estimated from the largest shards (their Parquet
    footers say their decoded size; other files count as their size on disk). Answers the
    bytes a row of them takes, decoded (None: the shards have no rows).

    Raises:
        InvalidArgument: the block does not fit, saying by how much and what to change.
    """
    count = spec.shuffle_block_size if spec.shuffle else 1
    largest = sorted(reader.main_shards, key=lambda s: s.size_bytes, reverse=True)[:count]
    need = sum(reader.decoded_bytes(shard) for shard in largest)
    rows = sum(shard.num_rows for shard in largest)
    if need <= memory.max_bytes:
        return need / rows if rows else None
    what = f"{len(largest)} shards" if len(largest) > 1 else "one shard"
    fix = "a smaller shuffle_block_size, or " if len(largest) > 1 else ""
    raise InvalidArgument(
        f"a block of this iteration ({what}, about {need / (1 << 20):,.0f} MiB decoded) does "
        f"not fit the server's memory budget of {memory.max_bytes >> 20} MiB: ask for {fix}"
        "a server started with a larger --memory-mb (or write smaller shards)"
    )


@dataclass
class IterationSetup(Plans):
    """An iteration's readers and transforms, over its ``Plans`` (see module doc)."""

    dataset: Dataset = field(kw_only=True)
    """The dataset (a mixture's first source's)."""
    reader: DatasetReader = field(kw_only=True)
    pipeline: Pipeline = field(kw_only=True)
    sources: list[SourceSetup] = field(default_factory=list, kw_only=True)
    """A mixture's sources (empty otherwise)."""
    read_schema: pa.Schema | None = field(default=None, kw_only=True)
    """The rows read (a mixture's: its sources' columns, and the source column)."""
    row_bytes: float | None = field(default=None, kw_only=True)
    """About how many bytes a row read takes, decoded (None: not estimated, a mixture)."""

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

        Without ``plan`` (a new iteration), the main shards are frozen as they are now (of
        every source of a mixture) and ``seed`` is the shuffle seed.

        Raises:
            InvalidArgument: a shardset, column, plugin or parameter the spec names is wrong.
        """
        replication_partitions(spec.world_size, spec.replication_pg)  # bad groups fail here
        if spec.mixture is not None:
            sources, schema = build_sources(
                spec, service, plugins, plan.sources if plan is not None else None
            )
            dataset, reader = sources[0].dataset, sources[0].reader
            pipeline = build_pipeline(plugins, spec, dataset.uid_column_name, schema)
            if plan is None:
                plan = IterationPlan(
                    shards=[],
                    seed=seed,
                    sources=[s.shards for s in sources],
                    order_version=ORDER_VERSION,
                )
            return cls(spec, plan, dataset=dataset, reader=reader, pipeline=pipeline,
                       sources=sources, read_schema=schema)  # fmt: skip
        dataset = service.get_dataset(dataset_id=spec.dataset_id)
        reader = service.reader(dataset, spec.shardsets, spec.columns, spec.join)
        pipeline = build_pipeline(plugins, spec, dataset.uid_column_name, reader.schema)
        row_bytes = check_memory(spec, reader, service.memory)
        if plan is None:
            plan = IterationPlan(
                shards=[(shard.index, shard.num_rows) for shard in reader.main_shards],
                seed=seed,
                order_version=ORDER_VERSION,
            )
        return cls(
            spec, plan, dataset=dataset, reader=reader, pipeline=pipeline, row_bytes=row_bytes
        )

    @property
    def schema(self) -> pa.Schema:
        """The schema of the rows read (before transforms)."""
        return self.read_schema if self.read_schema is not None else self.reader.schema

    @property
    def plain(self) -> bool:
        """Rows go out as read: no transform, and no inner join leaving samples out."""
        return (
            self.pipeline.identity
            and self.spec.join == "left"
            and self.spec.categorizer is None
            and not any(s.pipeline.filters for s in self.sources)
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
