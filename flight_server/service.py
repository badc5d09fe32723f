"""The service: every catalog and storage operation the Flight layer exposes, as plain Python.

A thin facade over the parts that do the work: ``Locations`` (which storage may be opened,
under the ``StoragePolicy``), ``Registrar`` (shardsets created, synced and written),
``DatasetReader`` (joined reads), all sharing one ``ShardIO``, one ``UidIndexes`` and one
``ShardCache``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..catalog import Catalog
from ..protocol import ColumnOptions, Dataset, Shard, Shardset, SyncResult
from ..protocol.errors import DatasetNotFound, InvalidArgument
from .locations import Locations, Resolver
from .policy import StoragePolicy, check_printable
from .reading import DEFAULT_CACHE_BYTES, DatasetReader, Join, ShardCache
from .registration import DEFAULT_MAX_SHARD_BYTES, Registrar, ShardUpload
from .shard_io import ShardIO
from .storage import DEFAULT_RETRY, Location, RetryPolicy, resolve_location
from .uid_index import UidIndexes

__all__ = ["LavenderService"]

MAX_PREVIEW_ROWS = 10_000


class LavenderService:
    """Catalog management, shard I/O and dataset reads, independent of any protocol.

    Args:
        catalog: the system of record.
        resolve: turns a location URL and its storage options into a ``Location``.
        storage_defaults: default storage options per protocol (``{"s3": {...}}``), laid
            under each shardset's own options (see ``ServerSettings.storage_defaults``).
        retry: how storage calls are retried on transient errors.
        storage_roots: folders ``file://`` locations must be under (None: anywhere).
        index_dir: where uid indexes are kept (default: ``<catalog file>.indexes`` beside
            the catalog).
        join_cache_bytes: memory for feature shards read by joins by uid, shared by
            every read.
        allow_protocols: fsspec protocols allowed beyond ``file`` and the object stores
            (``--allow-protocol``; see ``policy``).
        allow_memory: accept ``memory://`` locations (tests and demos).
        max_shard_bytes: the largest shard written through the server (``--max-shard-mb``).
        shard_io: every read and write of a shard file (a subclass can count or hold them).
        indexes: the uid indexes (default: saved under ``index_dir``).
    """

    def __init__(
        self,
        catalog: Catalog,
        resolve: Resolver = resolve_location,
        storage_defaults: Mapping[str, Mapping[str, Any]] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        storage_roots: Sequence[str | Path] | None = None,
        index_dir: Path | None = None,
        join_cache_bytes: int = DEFAULT_CACHE_BYTES,
        *,
        allow_protocols: Iterable[str] = (),
        allow_memory: bool = False,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        shard_io: ShardIO | None = None,
        indexes: UidIndexes | None = None,
    ) -> None:
        self.catalog = catalog
        self.policy = StoragePolicy.build(storage_roots, allow_protocols, allow_memory)
        self.locations = Locations(self.policy, resolve, storage_defaults, retry)
        self.shard_io = shard_io or ShardIO()
        self.indexes = indexes or UidIndexes(
            index_dir or catalog.path.with_name(catalog.path.name + ".indexes")
        )
        self.join_cache = ShardCache(join_cache_bytes)
        self.registrar = Registrar(
            catalog, self.locations, self.shard_io, self.indexes, max_shard_bytes
        )

    # -- storage -------------------------------------------------------------------------

    @property
    def storage_roots(self) -> list[Path] | None:
        """Folders ``file://`` locations must be under (None: anywhere)."""
        return None if self.policy.roots is None else list(self.policy.roots)

    @property
    def max_shard_bytes(self) -> int:
        """The largest shard (bytes of Arrow data) written through the server."""
        return self.registrar.max_shard_bytes

    def storage_options(self, url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options a location is opened with: the server's defaults, then ``options``."""
        return self.locations.options_for(url, options)

    def locate(self, url: str, options: Mapping[str, Any] | None = None) -> Location:
        """The resolved location of a URL, checked against the storage policy (kept for reuse)."""
        return self.locations.locate(url, options)

    def check_root(self, url: str) -> None:
        """Refuse a ``file://`` location outside the storage roots (``InvalidLocation``)."""
        self.policy.check_root(url)

    # -- datasets ------------------------------------------------------------------------

    def create_dataset(self, name: str, uid_column_name: str = "uid") -> Dataset:
        """Create an empty dataset (names with control characters are refused)."""
        check_printable("dataset name", name)
        check_printable("uid column name", uid_column_name)
        return self.catalog.create_dataset(name, uid_column_name)

    def get_dataset(self, dataset_id: str | None = None, name: str | None = None) -> Dataset:
        """A dataset by id or name."""
        return self.catalog.get_dataset(dataset_id=dataset_id, name=name)

    def find_dataset(self, key: str) -> Dataset:
        """A dataset by name, or by id when no dataset has that name (Flight paths use either)."""
        try:
            return self.catalog.get_dataset(name=key)
        except DatasetNotFound:
            pass
        try:
            return self.catalog.get_dataset(dataset_id=key)
        except DatasetNotFound:
            raise DatasetNotFound(f"no dataset named {key!r} (nor with that id)") from None

    def list_datasets(self) -> list[Dataset]:
        """Every dataset."""
        return self.catalog.list_datasets()

    def delete_dataset(self, dataset_id: str) -> None:
        """Forget a dataset (its shard files stay where they are)."""
        shardsets = self.catalog.get_dataset(dataset_id=dataset_id).shardsets
        self.catalog.delete_dataset(dataset_id)
        for shardset in shardsets:
            self.indexes.drop(shardset.id)

    # -- shardsets -----------------------------------------------------------------------

    def create_shardset(
        self,
        dataset_id: str,
        location: str,
        columns: Sequence[ColumnOptions] | None = None,
        is_main: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Shardset:
        """Add a shardset stored at ``location``; shards already there are checked and registered.

        Without ``columns`` they are inferred from the first shard found at the location.
        ``storage_options`` (fsspec options: s3fs ``key``, ``secret``, ``endpoint_url``,
        ``client_kwargs``...) are stored with the shardset and laid over the server's
        defaults whenever its location is opened; only the values of names known to be
        safe are ever shown back. The location and its options must pass the storage
        policy (``StoragePolicy``).
        """
        options = None if storage_options is None else dict(storage_options)
        return self.registrar.create_shardset(dataset_id, location, columns, is_main, options)

    def infer_columns(self, location: str) -> list[ColumnOptions]:
        """The columns of the first shard file at a location.

        What ``create_shardset`` would infer, so a user can check and edit them first.
        """
        return self.registrar.infer_columns(location)

    def get_shardset(self, dataset_id: str, shardset_id: str) -> Shardset:
        """One shardset of a dataset."""
        return self.catalog.get_shardset(dataset_id, shardset_id)

    def delete_shardset(self, dataset_id: str, shardset_id: str) -> None:
        """Forget a shardset (its files stay)."""
        self.catalog.delete_shardset(dataset_id, shardset_id)
        self.indexes.drop(shardset_id)

    def list_shards(self, dataset_id: str, shardset_id: str) -> list[Shard]:
        """The shards of a shardset."""
        self.catalog.get_shardset(dataset_id, shardset_id)
        return self.catalog.list_shards(shardset_id)

    def sync_shardset(self, dataset_id: str, shardset_id: str) -> SyncResult:
        """Register shard files added at the location, re-read changed ones, drop vanished ones.

        Every new or changed file is checked against the declared columns first; one bad
        file fails the whole sync and leaves the catalog as it was.
        """
        return self.registrar.sync_shardset(dataset_id, shardset_id)

    # -- shards through the server -------------------------------------------------------

    def write_shard(
        self,
        dataset_id: str,
        shardset_id: str,
        shard_index: int,
        table: pa.Table,
        fmt: str = "parquet",
        overwrite: bool = False,
    ) -> Shard:
        """Write ``table`` as shard ``shard_index`` of a shardset and register it."""
        return self.registrar.write_shard(
            dataset_id, shardset_id, shard_index, table, fmt, overwrite
        )

    def write_upload(
        self,
        dataset_id: str,
        shardset_id: str,
        shard_index: int,
        upload: ShardUpload,
        fmt: str = "parquet",
        overwrite: bool = False,
    ) -> Shard:
        """Write a shard arriving batch by batch (``do_put``), every check before its rows.

        The target (dataset, shardset, index, overwrite, location) and the declared
        columns are checked before one batch is read; the batches are then read one at a
        time and the upload is refused once their bytes pass ``max_shard_bytes``.
        """
        return self.registrar.write_upload(
            dataset_id, shardset_id, shard_index, upload, fmt, overwrite
        )

    # -- reads ---------------------------------------------------------------------------

    def reader(
        self,
        dataset: Dataset,
        shardset_ids: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        join: Join = "left",
    ) -> DatasetReader:
        """A reader of the joined rows of ``dataset`` (sharing the uid indexes and cache)."""
        return DatasetReader(
            self.catalog,
            dataset,
            shardset_ids,
            columns,
            self.locations.resolver(dataset),
            join=join,
            indexes=self.indexes,
            cache=self.join_cache,
            shard_io=self.shard_io,
        )

    @staticmethod
    def check_readable(dataset: Dataset) -> None:
        """Refuse to read a dataset with no shardset yet (it has no rows and no columns).

        Raises:
            InvalidArgument: saying so, and what to do.
        """
        if dataset.main_shardset is None:
            raise InvalidArgument(
                f"dataset {dataset.name!r} has no shardset yet, so no rows to read: add one "
                "with create_shardset"
            )

    def dataset_schema(self, dataset: Dataset) -> pa.Schema:
        """The joined schema of all shardsets of a dataset (empty before the first one)."""
        if dataset.main_shardset is None:
            return pa.schema([])
        return self.reader(dataset).schema

    def preview_dataset(
        self,
        dataset_id: str,
        offset: int = 0,
        limit: int = 10,
        columns: Sequence[str] | None = None,
        join: Join = "left",
    ) -> pa.Table:
        """Joined rows ``offset .. offset + limit`` of a dataset."""
        if offset < 0 or not 0 <= limit <= MAX_PREVIEW_ROWS:
            raise InvalidArgument(
                f"offset must be >= 0 and limit within 0..{MAX_PREVIEW_ROWS}, got {offset}, {limit}"
            )
        dataset = self.catalog.get_dataset(dataset_id=dataset_id)
        self.check_readable(dataset)
        reader = self.reader(dataset, columns=columns, join=join)
        pieces = list(reader.iter_rows(offset, limit))
        if not pieces:
            return reader.schema.empty_table()
        return pa.concat_tables(pieces)

    def summary(self) -> dict[str, Any]:
        """Counts for logs and health checks."""
        datasets = self.catalog.list_datasets()
        return {
            "datasets": len(datasets),
            "samples": sum(d.total_samples for d in datasets),
        }
