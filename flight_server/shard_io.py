"""The one way the server touches shard files: list, fetch, read, write and remove them.

Registration (create, sync, infer, uid indexes, writes) and every dataset read go through
one ``ShardIO``, so what the server does to storage is one object's calls: a test counts or
holds reads with a small subclass, and a later cache or budget has one place to live.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..protocol.errors import InvalidLocation
from .shards import fetch_shard, format_of, read_shard, read_shard_schema, write_shard
from .storage import Location, ShardFile

__all__ = ["ShardIO"]

FOOTERS_KEPT = 4096
"""Decoded sizes of local Parquet files remembered (by path, columns and modification)."""


class ShardIO:
    """Reads, fetches and writes shard files through a ``Location`` (formats: ``shards``).

    Thread-safe: one instance serves every request of a server. Its only state is a
    bounded memo of local Parquet footers' decoded sizes (``decoded_size``: every check and
    creation of an iteration asks it for the shards of its largest block).
    """

    def __init__(self) -> None:
        self._sizes: OrderedDict[tuple[object, ...], int] = OrderedDict()
        self._sizes_lock = threading.Lock()

    def list(self, where: Location) -> list[ShardFile]:
        """The shard files directly in a location (files of no shard format left out), by name."""
        return [f for f in where.list_files() if format_of(f.path) is not None]

    def fetch(self, where: Location, path: str, size: int | None = None) -> pa.Buffer | None:
        """A remote shard's bytes, to read it more than once; None for a local file.

        Args:
            where: its location.
            path: its storage path.
            size: its size when known (saves a request).
        """
        return fetch_shard(where, path, size)

    def read(
        self,
        where: Location,
        path: str,
        fmt: str,
        schema: pa.Schema,
        columns: Sequence[str] | None = None,
        data: pa.Buffer | None = None,
        size: int | None = None,
    ) -> pa.Table:
        """A shard as a table of the declared ``schema`` (projected on ``columns``).

        Args:
            where: its location.
            path: its storage path.
            fmt: its format (``parquet``, ``arrow``, ``csv``, ``jsonl``).
            schema: the shardset's declared columns.
            columns: the ones to read (default: all declared).
            data: its bytes, when already fetched.
            size: its size when known (saves a request).

        Raises:
            SchemaMismatch: a column is missing or cannot be read as declared.
            ShardNotFound: the file is gone.
            StorageError: storage failed (after retries).
        """
        return read_shard(where, path, fmt, schema, columns, data, size)

    def decoded_size(
        self,
        where: Location,
        path: str,
        fmt: str,
        columns: Sequence[str] | None = None,
        size: int | None = None,
    ) -> int:
        """About how many bytes a shard takes once decoded (for the memory budget).

        A local Parquet file says so in its footer (the uncompressed size of the columns
        read); any other file counts as its size on disk (no request to a remote store).
        """
        if fmt == "parquet" and where.is_local:
            try:
                info = where.arrow_fs.get_file_info(path)
                key = (path, None if columns is None else tuple(columns), info.size, info.mtime_ns)
                with self._sizes_lock:
                    known = self._sizes.get(key)
                if known is not None:
                    return max(known, int(size or 0))
                metadata = pq.read_metadata(where.arrow_fs.open_input_file(path))
            except (OSError, pa.ArrowException):
                return int(size or 0)
            wanted = None if columns is None else set(columns)
            total = 0
            for group in range(metadata.num_row_groups):
                row_group = metadata.row_group(group)
                for index in range(row_group.num_columns):
                    chunk = row_group.column(index)
                    if wanted is None or chunk.path_in_schema.split(".")[0] in wanted:
                        total += chunk.total_uncompressed_size
            with self._sizes_lock:
                self._sizes[key] = total
                while len(self._sizes) > FOOTERS_KEPT:
                    self._sizes.popitem(last=False)
            return max(total, int(size or 0))
        return int(size or 0)

    def read_schema(
        self, where: Location, path: str, fmt: str, data: pa.Buffer | None = None
    ) -> pa.Schema:
        """The schema stored in a shard (CSV and JSON lines: inferred from its first block)."""
        return read_shard_schema(where, path, fmt, data)

    def write(self, where: Location, path: str, table: pa.Table, fmt: str) -> int:
        """Write a table as one shard file, whole or not at all; its size in bytes.

        Raises:
            InvalidLocation: the location is read-only.
            InvalidArgument: the format cannot hold these columns.
            StorageError: storage failed (after retries).
        """
        if where.read_only:
            raise InvalidLocation(
                f"location {where.shown} is read-only ({where.protocol}): write shards to "
                "file:// or an object store"
            )
        return write_shard(where, path, table, fmt)

    def remove(self, where: Location, path: str) -> None:
        """Delete a shard file (a missing one is fine)."""
        where.remove(path)
