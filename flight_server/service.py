"""The service: every catalog and storage operation the Flight layer exposes, as plain Python."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
from fsspec.core import split_protocol

from ..catalog import Catalog, new_id
from ..protocol import (
    ColumnOptions,
    Dataset,
    Shard,
    Shardset,
    SyncResult,
    column_clashes,
    format_type,
    parse_type,
)
from ..protocol.errors import (
    DatasetNotFound,
    InvalidArgument,
    InvalidLocation,
    SchemaMismatch,
    ShardAlreadyExists,
)
from .reading import DEFAULT_CACHE_BYTES, DatasetReader, Join, ShardCache
from .shards import (
    canonical_format,
    check_shard_schema,
    conform,
    declared_schema,
    fetch_shard,
    format_of,
    read_shard,
    read_shard_schema,
    shard_file_name,
    shard_index_of,
    shard_stats,
    write_shard,
)
from .storage import (
    DEFAULT_RETRY,
    S3_PROTOCOLS,
    Location,
    RetryPolicy,
    ShardFile,
    merge_options,
    options_key,
    protocol_of,
    resolve_location,
)
from .uid_index import UidIndexes

__all__ = ["LavenderService"]

log = logging.getLogger(__name__)

MAX_PREVIEW_ROWS = 10_000
# shards scanned side by side when a shardset in remote storage is created or synced
SCAN_THREADS = 8

Resolver = Callable[[str, Mapping[str, Any], RetryPolicy], Location]


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
    ) -> None:
        self.catalog = catalog
        self.indexes = UidIndexes(
            index_dir or catalog.path.with_name(catalog.path.name + ".indexes")
        )
        self.join_cache = ShardCache(join_cache_bytes)
        self.storage_roots = (
            None
            if storage_roots is None
            else [Path(r).expanduser().resolve() for r in storage_roots]
        )
        self.resolve = resolve
        self.storage_defaults = {k: dict(v) for k, v in (storage_defaults or {}).items()}
        self.retry = retry
        self._locations: dict[tuple[str, str], Location] = {}
        self._locations_lock = threading.Lock()

    # -- storage -------------------------------------------------------------------------

    def storage_options(self, url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options a location is opened with: the server's defaults, then ``options``."""
        protocol = protocol_of(url)
        if protocol in S3_PROTOCOLS:
            protocol = "s3"
        return merge_options(self.storage_defaults.get(protocol, {}), options or {})

    def locate(self, url: str, options: Mapping[str, Any] | None = None) -> Location:
        """The resolved location of a URL opened with ``options`` over the server's defaults.

        Locations are kept by URL and options, so a filesystem (an s3fs client with its
        connection pool) is built once and reused by every read, not per shard.
        """
        merged = self.storage_options(url, options)
        if protocol_of(url) == "file":  # cheap to resolve, and relative paths follow the cwd
            self.check_root(url)
            return self.resolve(url, merged, self.retry)
        key = (url.strip(), options_key(merged))
        with self._locations_lock:
            found = self._locations.get(key)
        if found is not None:
            return found
        location = self.resolve(url, merged, self.retry)
        with self._locations_lock:
            found = self._locations.setdefault(key, location)
            self._locations.setdefault((location.url, key[1]), found)
        return found

    def check_root(self, url: str) -> None:
        """Refuse a ``file://`` location outside the storage roots.

        ``..`` and symlinks are followed first, so neither escapes a root.

        Raises:
            InvalidLocation: the folder is outside every root.
        """
        if self.storage_roots is None:
            return
        _, path = split_protocol(url.strip())
        try:
            real = Path(path).expanduser().resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise InvalidLocation(f"cannot resolve location {url!r}: {exc}") from exc
        if any(real == root or real.is_relative_to(root) for root in self.storage_roots):
            return
        roots = ", ".join(str(r) for r in self.storage_roots)
        raise InvalidLocation(
            f"location {url.strip()!r} is outside the server's storage roots ({roots}); "
            "start the server with --storage-root to allow it"
        )

    def _where(self, shardset: Shardset) -> Location:
        return self.locate(shardset.location, shardset.storage_options)

    def _resolver(self, dataset: Dataset) -> Callable[[str], Location]:
        """Resolves the locations of a dataset's shardsets, each with its own options."""
        options = {s.location: s.storage_options for s in dataset.shardsets}
        return lambda url: self.locate(url, options.get(url))

    # -- datasets ------------------------------------------------------------------------

    def create_dataset(self, name: str, uid_column_name: str = "uid") -> Dataset:
        """Create an empty dataset."""
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
        defaults whenever its location is opened; their secrets are never shown back.
        """
        dataset = self.catalog.get_dataset(dataset_id=dataset_id)
        where = self.locate(location, storage_options)
        files = self._shard_files(where)
        if columns is None:
            columns = self._infer(where, files)
        self._check_joinable(dataset, columns)
        uid = dataset.uid_column_name
        schema = declared_schema([(c.name, c.type_) for c in columns])
        scanned = self._scan_shards(where, list(self._indexed(files, [])), schema, uid)
        shardset_id = new_id("ss")
        shards = [shard for shard, _ in scanned]
        main = is_main or dataset.main_shardset is None
        if not main:  # it adds columns: joins look its uids up, each must be there once
            for shard, uids in scanned:
                self.indexes.save_run(shardset_id, shard, uids)
            self._build_index(shardset_id, shards, schema, where, uid)
        elif dataset.main_shardset is not None:  # the old main one starts adding columns
            self._index_of(dataset, dataset.main_shardset)
        return self.catalog.create_shardset(
            dataset_id,
            where.url,
            columns,
            is_main,
            shards,
            shardset_id=shardset_id,
            storage_options=storage_options,
        )

    @staticmethod
    def _check_joinable(dataset: Dataset, columns: Sequence[ColumnOptions]) -> None:
        """Refuse, before reading any shard, columns that cannot join the dataset's others.

        Raises:
            InvalidArgument: the uid column is missing, of another kind (integer or string)
                than in the other shardsets, or a column name is taken by another shardset.
        """
        uid = dataset.uid_column_name
        names = [c.name for c in columns]
        if uid not in names:
            raise InvalidArgument(
                f"the shardset's columns {names} lack the dataset's uid column {uid!r}: "
                "every shardset carries it to be joined by uid"
            )
        taken = [(c.name, s.id) for s in dataset.shardsets for c in s.columns]
        clashes = column_clashes(uid, names, taken)
        if clashes:
            raise InvalidArgument(
                f"column names clash with other shardsets of the dataset: {', '.join(clashes)}; "
                "rename them (every column but the uid belongs to one shardset)"
            )
        uid_type = parse_type(next(c.type_ for c in columns if c.name == uid))
        for other in dataset.shardsets:
            theirs = parse_type(next(c.type_ for c in other.columns if c.name == uid))
            if pa.types.is_integer(theirs) != pa.types.is_integer(uid_type):
                raise InvalidArgument(
                    f"uid column {uid!r} is {format_type(uid_type)} here but "
                    f"{format_type(theirs)} in shardset {other.id}: shardsets join by uid, "
                    "so they must agree on integer or string uids"
                )

    def _build_index(
        self,
        shardset_id: str,
        shards: Sequence[Shard],
        schema: pa.Schema,
        where: Location,
        uid: str,
    ) -> None:
        """Build a shardset's uid index now (at sync), refusing a uid held twice."""
        self.indexes.get(
            shardset_id,
            shards,
            exact=pa.types.is_integer(schema.field(uid).type),
            read_uids=lambda shard: read_shard(
                where, where.path_of(shard.location), shard.format, schema, [uid]
            ).column(uid),
            unique=True,
        )

    def _index_of(self, dataset: Dataset, shardset: Shardset) -> None:
        schema = declared_schema([(c.name, c.type_) for c in shardset.columns])
        self._build_index(
            shardset.id,
            self.catalog.list_shards(shardset.id),
            schema,
            self._where(shardset),
            dataset.uid_column_name,
        )

    def infer_columns(self, location: str) -> list[ColumnOptions]:
        """The columns of the first shard file at a location.

        What ``create_shardset`` would infer, so a user can check and edit them first.
        """
        where = self.locate(location)
        return self._infer(where, self._shard_files(where))

    @staticmethod
    def _infer(where: Location, files: Sequence[ShardFile]) -> list[ColumnOptions]:
        if not files:
            raise InvalidArgument(
                f"no shard file at {where.url} to infer columns from: pass columns=[...] "
                "or write a shard there first"
            )
        first = files[0]
        found = read_shard_schema(where, first.path, format_of(first.path) or "parquet")
        return [ColumnOptions(name=f.name, type_=format_type(f.type)) for f in found]

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
        dataset = self.catalog.get_dataset(dataset_id=dataset_id)
        shardset = self.catalog.get_shardset(dataset_id, shardset_id)
        where = self._where(shardset)
        schema = declared_schema([(c.name, c.type_) for c in shardset.columns])
        known = {s.location: s for s in self.catalog.list_shards(shardset_id)}
        files = self._shard_files(where)
        present = {where.url_of(f.path) for f in files}
        removed = [s for url, s in known.items() if url not in present]
        changed: list[tuple[ShardFile, int]] = []
        new_files = []
        for file in files:
            old = known.get(where.url_of(file.path))
            if old is None:
                new_files.append(file)
            elif old.size_bytes != file.size:
                changed.append((file, old.index))
        taken = [s.index for s in known.values() if s not in removed]
        fresh = list(self._indexed(new_files, taken))
        uid = dataset.uid_column_name
        scanned = self._scan_shards(where, [*changed, *fresh], schema, uid)
        updated = [shard for shard, _ in scanned[: len(changed)]]
        added = [shard for shard, _ in scanned[len(changed) :]]
        if not shardset.is_main:  # (a main shardset is never looked up: it has no index)
            for shard, uids in scanned:
                self.indexes.save_run(shardset_id, shard, uids)
            # built before the catalog changes: a uid held twice leaves it as it was
            final = {s.index: s for s in known.values() if s not in removed}
            final.update((s.index, s) for s in [*updated, *added])
            self._build_index(shardset_id, list(final.values()), schema, where, uid)
        self.catalog.replace_shards(shardset_id, [*added, *updated], [s.index for s in removed])
        total = self.catalog.get_shardset(dataset_id, shardset_id)
        log.info(
            "synced %s: %d added, %d updated, %d removed",
            where.url,
            len(added),
            len(updated),
            len(removed),
        )
        return SyncResult(
            shardset_id=shardset_id,
            added=added,
            updated=updated,
            removed=[s.location for s in removed],
            shard_count=total.shard_count,
            total_samples=total.total_samples,
        )

    @staticmethod
    def _shard_files(where: Location) -> list[ShardFile]:
        return [f for f in where.list_files() if format_of(f.path) is not None]

    @staticmethod
    def _indexed(
        files: Sequence[ShardFile], taken: Sequence[int]
    ) -> Iterator[tuple[ShardFile, int]]:
        """Give each file an index: the one in its ``shard.N.ext`` name when free, else the next."""
        used = set(taken)
        wanted = {id(f): shard_index_of(f.path) for f in files}
        used.update(i for i in wanted.values() if i is not None and i not in used)
        claimed: set[int] = set(taken)
        next_free = 0
        for file in files:
            index = wanted[id(file)]
            if index is None or index in claimed:
                while next_free in used or next_free in claimed:
                    next_free += 1
                index = next_free
            claimed.add(index)
            yield file, index

    def _scan_shards(
        self,
        where: Location,
        files: Sequence[tuple[ShardFile, int]],
        schema: pa.Schema,
        uid: str,
    ) -> list[tuple[Shard, pa.ChunkedArray]]:
        """Check and describe shard files, in order; remote ones several at a time.

        Each comes with its uids (for the shardset's uid index).
        """

        def scan(item: tuple[ShardFile, int]) -> tuple[Shard, pa.ChunkedArray]:
            return self._scan_shard(where, item[0], item[1], schema, uid)

        if where.is_local or len(files) < 2:
            return [scan(item) for item in files]
        with ThreadPoolExecutor(
            min(SCAN_THREADS, len(files)), thread_name_prefix="lavender-scan"
        ) as pool:
            return list(pool.map(scan, files))

    def _scan_shard(
        self, where: Location, file: ShardFile, index: int, schema: pa.Schema, uid: str
    ) -> tuple[Shard, pa.ChunkedArray]:
        fmt = format_of(file.path) or "parquet"
        url = where.url_of(file.path)
        data = fetch_shard(where, file.path, file.size)  # remote: fetched once, read twice
        if fmt in ("parquet", "arrow"):
            check_shard_schema(read_shard_schema(where, file.path, fmt, data), schema, url)
            table = read_shard(where, file.path, fmt, schema, [uid], data)
        else:  # text formats carry no types: reading with the declared ones is the check
            table = read_shard(where, file.path, fmt, schema, data=data)
        try:
            stats = shard_stats(table, uid)
        except SchemaMismatch as exc:
            raise SchemaMismatch(f"shard {url}: {exc}") from exc
        shard = Shard(
            shardset_id="",
            index=index,
            location=url,
            format=fmt,
            num_rows=stats.num_rows,
            size_bytes=file.size,
            uid_min=stats.uid_min,
            uid_max=stats.uid_max,
            created_at=time.time(),
        )
        return shard, table.column(uid)

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
        if shard_index < 0:
            raise InvalidArgument(f"shard_index must be >= 0, got {shard_index}")
        fmt = canonical_format(fmt)
        dataset = self.catalog.get_dataset(dataset_id=dataset_id)
        shardset = self.catalog.get_shardset(dataset_id, shardset_id)
        existing = {s.index: s for s in self.catalog.list_shards(shardset_id)}
        if shard_index in existing and not overwrite:
            raise ShardAlreadyExists(
                f"shard {shard_index} of shardset {shardset_id} exists "
                f"({existing[shard_index].location}); write with overwrite=True to replace it"
            )
        where = self._where(shardset)
        schema = declared_schema([(c.name, c.type_) for c in shardset.columns])
        extra = [n for n in table.column_names if n not in schema.names]
        if extra:
            raise SchemaMismatch(
                f"columns {', '.join(map(repr, extra))} are not declared in shardset "
                f"{shardset_id} (declared: {', '.join(schema.names)})"
            )
        table = conform(table, schema, f"{where.url} shard {shard_index}", lenient=True)
        stats = shard_stats(table, dataset.uid_column_name)
        path = where.child(shard_file_name(shard_index, fmt))
        old = existing.get(shard_index)
        size = write_shard(where, path, table, fmt)
        url = where.url_of(path)
        if old is not None and old.location != url:
            try:
                where.remove(where.path_of(old.location))
            except OSError:
                log.warning("could not remove replaced shard file %s", old.location)
        shard = Shard(
            shardset_id=shardset_id,
            index=shard_index,
            location=url,
            format=fmt,
            num_rows=stats.num_rows,
            size_bytes=size,
            uid_min=stats.uid_min,
            uid_max=stats.uid_max,
            created_at=time.time(),
        )
        if not shardset.is_main:
            self.indexes.save_run(shardset_id, shard, table.column(dataset.uid_column_name))
        self.catalog.replace_shards(shardset_id, [shard])
        return shard

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
            self._resolver(dataset),
            join=join,
            indexes=self.indexes,
            cache=self.join_cache,
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
        if dataset.main_shardset is None:
            return pa.table({})
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
