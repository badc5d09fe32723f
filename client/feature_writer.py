"""``FeatureWriter``: a feature shardset written from the output of any loop.

Rows come in batches of uid + new columns (an ``Iteration``'s output, a model's scores) and
are cut into shards at the main shardset's row counts (see ``features`` for the pieces).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import pyarrow as pa

from ..protocol import ColumnOptions, Shardset
from ..protocol.errors import InvalidArgument, SchemaMismatch
from . import api
from .connection import LavenderClient
from .features import ComputeOutput, _as_table, _Target

__all__ = ["FeatureWriter"]


class FeatureWriter:
    """Writes a feature shardset from tables of uid + new columns, e.g. an iteration's output.

    Rows are buffered and cut into shards at the row counts of the main shardset's shards:
    rows written in the main shardset's order (``Iteration.from_dataset(..., shuffle=False,
    format="arrow")``) land aligned, feature shard ``i`` holding the uids of main shard
    ``i``, which the server attaches without a lookup. Rows in any other order are joined by
    uid all the same, only less cheaply. Rows past the main shardset's count go to further
    shards.

    Use it as a context manager::

        with FeatureWriter(dataset.id, "file:///data/features") as writer:
            for batch in iteration:
                writer.write({"uid": batch.column("uid"), "score": model(batch)})

    ``close()`` (or leaving the block without an exception) writes the rows still buffered
    and returns the shardset. When the block raises, the shards written so far stay and the
    buffered rows are dropped. The shardset is the one already at ``location`` (same folder as
    :func:`normalize_location` decides), else it is created at the first ``write``; at
    ``close()``, shards of it that this writer did not write are emptied, so it holds exactly
    the rows written.
    """

    def __init__(
        self,
        dataset_id: str,
        location: str,
        *,
        format: str = "parquet",
        output_columns: Sequence[ColumnOptions | dict[str, Any]] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        client: LavenderClient | None = None,
    ) -> None:
        """Prepare to write the feature shardset of ``dataset_id`` at ``location``.

        Args:
            dataset_id: the dataset.
            location: the folder of the feature shardset (``file://...``, ``s3://...``).
            format: shard format: ``parquet``, ``arrow``, ``csv`` or ``jsonl``.
            output_columns: the new columns' declarations (``ColumnOptions`` or dicts);
                default: the types of the first table written.
            storage_options: fsspec options of the location, as in ``create_shardset``.
            client: the connection to the server (default: the default client).
        """
        client = client or api.get_client()
        self._target = _Target(
            client, dataset_id, location, format, output_columns, storage_options
        )
        main_shards = client.list_shards(dataset_id, self._target.main.id)
        self._plan = deque((s.index, s.num_rows) for s in main_shards if s.num_rows)
        self._extra_rows = max((rows for _, rows in self._plan), default=0)
        self._next_extra = max((s.index for s in main_shards), default=-1) + 1
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._rows = 0
        self._writes = 0
        self._written: set[int] = set()
        self._closed = False
        self.shardset: Shardset | None = self._target.shardset
        """The feature shardset (None before the first write; fresh after ``close``)."""

    @property
    def rows_written(self) -> int:
        """Rows handed to ``write`` so far."""
        return self._rows

    def write(self, data: ComputeOutput) -> None:
        """Add rows: the uid column and the new columns (a table, record batch or mapping)."""
        if self._closed:
            raise InvalidArgument("this FeatureWriter is closed")
        target = self._target
        where = f"write #{self._writes} (rows {self._rows}..)"
        table = _as_table(data, where)
        if target.uid not in table.column_names:
            raise SchemaMismatch(
                f"{where}: no uid column {target.uid!r} (columns: {table.column_names}); "
                "every row names its sample"
            )
        target.check_names([n for n in table.column_names if n != target.uid], where)
        table = target.conform(table, where)
        if table.column(target.uid).null_count:
            raise SchemaMismatch(f"{where}: the uid column {target.uid!r} holds nulls")
        self.shardset = target.ensure()
        self._writes += 1
        self._rows += table.num_rows
        if table.num_rows:
            self._buffer.append(table)
            self._buffered += table.num_rows
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write every complete shard buffered (``final``: the partial last one too)."""
        while self._buffered:
            if self._plan:
                index, size = self._plan[0]
            else:
                index, size = self._next_extra, self._extra_rows or self._buffered
            if self._buffered < size and not final:
                return
            take = min(size, self._buffered)
            table = pa.concat_tables(self._buffer)
            rest = table.slice(take)
            self._target.write(table.slice(0, take), index)
            self._written.add(index)
            self._buffer = [rest] if rest.num_rows else []
            self._buffered -= take
            if self._plan:
                self._plan.popleft()
            else:
                self._next_extra += 1

    def close(self) -> Shardset:
        """Write the buffered rows, empty the stale shards; return the shardset."""
        target = self._target
        if not self._closed:
            self._closed = True
            self._flush(final=True)
            schema = target.schema
            if schema is not None:
                for index in sorted(set(target.shards) - self._written):
                    target.write(schema.empty_table(), index)
        if target.shardset is None and target.declared is None:
            raise InvalidArgument(
                f"nothing was written to the feature shardset at {target.location!r}: its "
                "columns are unknown; write rows or pass output_columns"
            )
        self.shardset = target.fresh()
        return self.shardset

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True  # what was written stays; the buffered rows are dropped
            self._buffer, self._buffered = [], 0
