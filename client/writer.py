"""``Writer``: write shards of a shardset through the server (the client never touches storage)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from ..protocol import Shard, Shardset, parse_type
from ..protocol.errors import SchemaMismatch
from . import api
from .connection import LavenderClient

__all__ = ["Writer"]


class Writer:
    """Writes shards of one shardset.

    Use it as ``Writer.get(format=, dataset_id=, shardset_id=).write(samples)``; the
    samples are checked against the shardset's columns, then the server writes the file.
    """

    def __init__(self, client: LavenderClient, shardset: Shardset, format: str = "parquet") -> None:
        self.client = client
        self.shardset = shardset
        self.format = format
        self.schema = pa.schema([pa.field(c.name, parse_type(c.type_)) for c in shardset.columns])

    @classmethod
    def get(
        cls,
        format: str = "parquet",
        *,
        dataset_id: str,
        shardset_id: str,
        client: LavenderClient | None = None,
    ) -> Writer:
        """A writer of ``format`` (parquet, arrow, csv, jsonl) for a shardset.

        ``client``: the connection to write through (default: the default client).
        """
        client = client or api.get_client()
        return cls(client, client.get_shardset(dataset_id, shardset_id), format)

    def _table(self, samples: Sequence[Mapping[str, Any]] | pa.Table | pa.RecordBatch) -> pa.Table:
        if isinstance(samples, pa.RecordBatch):
            return pa.Table.from_batches([samples])
        if isinstance(samples, pa.Table):
            return samples
        keys: set[str] = set()
        for sample in samples:
            keys.update(sample)
        extra = sorted(keys - set(self.schema.names))
        if extra:
            raise SchemaMismatch(
                f"samples have column(s) {', '.join(map(repr, extra))} that shardset "
                f"{self.shardset.id} does not declare ({', '.join(self.schema.names)})"
            )
        try:
            return pa.Table.from_pylist(list(samples), schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
            raise SchemaMismatch(f"samples do not fit the declared columns: {exc}") from None

    def write(
        self,
        samples: Sequence[Mapping[str, Any]] | pa.Table | pa.RecordBatch,
        shard_index: int = 0,
        overwrite: bool = False,
    ) -> Shard:
        """Write ``samples`` (dicts or an Arrow table) as shard ``shard_index`` and register it."""
        return self.client.write_shard(
            self.shardset.dataset_id,
            self.shardset.id,
            self._table(samples),
            shard_index=shard_index,
            format=self.format,
            overwrite=overwrite,
        )
