"""Registering shard files: create and sync shardsets, infer columns, write shards, uid indexes.

Everything that puts shards into the catalog is here, and nothing else: files found at a
location are checked against the declared columns and described (row count, uid range);
files written through the server are checked, written and described the same way. A
shardset that adds columns also gets its uid index (``uid_index``) built as it is synced.
All storage goes through one ``Locations`` (the policy) and one ``ShardIO``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

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
from ..protocol.errors import InvalidArgument, SchemaMismatch, ShardAlreadyExists
from ..protocol.redaction import redact_urls
from .locations import Locations
from .policy import check_printable
from .shard_io import ShardIO
from .shards import (
    canonical_format,
    check_shard_schema,
    check_written_schema,
    conform,
    declared_schema,
    format_of,
    shard_file_name,
    shard_index_of,
    shard_stats,
)
from .storage import Location, ShardFile
from .uid_index import UidIndexes

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "Registrar", "ShardTarget", "ShardUpload"]

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 1024 << 20
# shards scanned side by side when a shardset in remote storage is created or synced
SCAN_THREADS = 8


class ShardUpload(Protocol):
    """A shard arriving from a client: its schema first, then its batches, read on demand."""

    @property
    def schema(self) -> pa.Schema:
        """The schema the client declared for the stream."""
        ...

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The record batches, each read from the client when asked for."""
        ...


@dataclass(frozen=True)
class ShardTarget:
    """Where a shard written through the server goes; every check that needs no row is done."""

    dataset: Dataset
    shardset: Shardset
    index: int
    fmt: str
    where: Location
    schema: pa.Schema
    replaces: Shard | None

    @property
    def label(self) -> str:
        """How messages name the shard: its location and index."""
        return f"{self.where.shown} shard {self.index}"


def _schema_of(shardset: Shardset) -> pa.Schema:
    return declared_schema([(c.name, c.type_) for c in shardset.columns])


class Registrar:
    """Puts shards into the catalog: from files found at a location, or written through us.

    Args:
        catalog: the system of record.
        locations: resolves (and polices) locations.
        shard_io: every read and write of a shard file.
        indexes: the uid indexes of shardsets that add columns.
        max_shard_bytes: the largest shard (bytes of Arrow data) written through the server.
    """

    def __init__(
        self,
        catalog: Catalog,
        locations: Locations,
        shard_io: ShardIO,
        indexes: UidIndexes,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        self.catalog = catalog
        self.locations = locations
        self.shard_io = shard_io
        self.indexes = indexes
        self.max_shard_bytes = max_shard_bytes

    # -- shardsets -----------------------------------------------------------------------

    def create_shardset(
        self,
        dataset_id: str,
        location: str,
        columns: Sequence[ColumnOptions] | None = None,
        is_main: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> Shardset:
        """Add a shardset stored at ``location``; shards already there are checked and registered.

        Without ``columns`` they are inferred from the first shard found at the location.
        """
        dataset = self.catalog.get_dataset(dataset_id=dataset_id)
        for column in columns or ():
            check_printable("column name", column.name)
        where = self.locations.locate(location, storage_options)
        files = self.shard_io.list(where)
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

    def infer_columns(self, location: str) -> list[ColumnOptions]:
        """The columns of the first shard file at a location (what ``create_shardset`` infers)."""
        where = self.locations.locate(location)
        return self._infer(where, self.shard_io.list(where))

    def _infer(self, where: Location, files: Sequence[ShardFile]) -> list[ColumnOptions]:
        if not files:
            raise InvalidArgument(
                f"no shard file at {where.shown} to infer columns from: pass columns=[...] "
                "or write a shard there first"
            )
        first = files[0]
        found = self.shard_io.read_schema(where, first.path, format_of(first.path) or "parquet")
        for field in found:
            check_printable(f"column name in {where.url_of(first.path)}", field.name)
        return [ColumnOptions(name=f.name, type_=format_type(f.type)) for f in found]

    def sync_shardset(self, dataset_id: str, shardset_id: str) -> SyncResult:
        """Register shard files added at the location, re-read changed ones, drop vanished ones.

        Every new or changed file is checked against the declared columns first; one bad
        file fails the whole sync and leaves the catalog as it was.
        """
        dataset = self.catalog.get_dataset(dataset_id=dataset_id)
        shardset = self.catalog.get_shardset(dataset_id, shardset_id)
        where = self.locations.of(shardset)
        schema = _schema_of(shardset)
        known = {s.location: s for s in self.catalog.list_shards(shardset_id)}
        files = self.shard_io.list(where)
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
            where.shown,
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
        io = self.shard_io
        data = io.fetch(where, file.path, file.size)  # remote: fetched once, read twice
        if fmt in ("parquet", "arrow"):
            check_shard_schema(io.read_schema(where, file.path, fmt, data), schema, url)
            table = io.read(where, file.path, fmt, schema, [uid], data)
        else:  # text formats carry no types: reading with the declared ones is the check
            table = io.read(where, file.path, fmt, schema, data=data)
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

    # -- uid indexes ---------------------------------------------------------------------

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
            read_uids=lambda shard: self.shard_io.read(
                where, where.path_of(shard.location), shard.format, schema, [uid]
            ).column(uid),
            unique=True,
        )

    def _index_of(self, dataset: Dataset, shardset: Shardset) -> None:
        self._build_index(
            shardset.id,
            self.catalog.list_shards(shardset.id),
            _schema_of(shardset),
            self.locations.of(shardset),
            dataset.uid_column_name,
        )

    # -- shards written through the server -----------------------------------------------

    def target(
        self,
        dataset_id: str,
        shardset_id: str,
        shard_index: int,
        fmt: str = "parquet",
        overwrite: bool = False,
    ) -> ShardTarget:
        """Check where a shard is to be written, before any of its rows is at hand.

        Raises:
            InvalidArgument: a negative index or an unknown format.
            DatasetNotFound, ShardsetNotFound: no such target.
            ShardAlreadyExists: the index is taken and ``overwrite`` is off.
            InvalidLocation: the storage policy refuses to write there.
        """
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
        where = self.locations.of(shardset, write=True)
        return ShardTarget(
            dataset=dataset,
            shardset=shardset,
            index=shard_index,
            fmt=fmt,
            where=where,
            schema=_schema_of(shardset),
            replaces=existing.get(shard_index),
        )

    def check_columns(self, target: ShardTarget, schema: pa.Schema) -> None:
        """Refuse columns the shardset does not declare, or cannot take, before any row.

        Raises:
            SchemaMismatch: a column is not declared, a declared one is missing, or a type
                cannot be cast to the declared one.
        """
        extra = [n for n in schema.names if n not in target.schema.names]
        if extra:
            raise SchemaMismatch(
                f"columns {', '.join(map(repr, extra))} are not declared in shardset "
                f"{target.shardset.id} (declared: {', '.join(target.schema.names)})"
            )
        check_written_schema(schema, target.schema, target.label)

    def _too_big(self, target: ShardTarget, size: int) -> InvalidArgument:
        limit = self.max_shard_bytes / (1 << 20)
        return InvalidArgument(
            f"shard {target.index} of shardset {target.shardset.id} is over the server's limit "
            f"of {limit:g} MiB per shard ({size / (1 << 20):.1f} MiB so far; --max-shard-mb): "
            "write its rows as several shards"
        )

    def receive(self, target: ShardTarget, upload: ShardUpload) -> pa.Table:
        """Read an upload's batches, counting their bytes; refuse it once over the limit."""
        batches: list[pa.RecordBatch] = []
        size = 0
        for batch in upload.batches():
            size += batch.nbytes
            if size > self.max_shard_bytes:
                raise self._too_big(target, size)
            batches.append(batch)
        return pa.Table.from_batches(batches, schema=upload.schema)

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
        target = self.target(dataset_id, shardset_id, shard_index, fmt, overwrite)
        self.check_columns(target, table.schema)
        if table.nbytes > self.max_shard_bytes:
            raise self._too_big(target, table.nbytes)
        return self.store(target, table)

    def write_upload(
        self,
        dataset_id: str,
        shardset_id: str,
        shard_index: int,
        upload: ShardUpload,
        fmt: str = "parquet",
        overwrite: bool = False,
    ) -> Shard:
        """Write a shard arriving from a client: target and columns checked before its rows.

        An unknown target, a refused location or undeclared columns fail before one batch
        is read; the batches are then read one by one, and the upload fails as soon as
        their bytes pass ``max_shard_bytes``.
        """
        target = self.target(dataset_id, shardset_id, shard_index, fmt, overwrite)
        self.check_columns(target, upload.schema)
        return self.store(target, self.receive(target, upload))

    def store(self, target: ShardTarget, table: pa.Table) -> Shard:
        """Cast ``table`` to the declared columns, write it, register it (replacing the old)."""
        uid = target.dataset.uid_column_name
        table = conform(table, target.schema, target.label, lenient=True)
        stats = shard_stats(table, uid)
        where = target.where
        path = where.child(shard_file_name(target.index, target.fmt))
        size = self.shard_io.write(where, path, table, target.fmt)
        url = where.url_of(path)
        old = target.replaces
        if old is not None and old.location != url:
            try:
                self.shard_io.remove(where, where.path_of(old.location))
            except OSError:
                log.warning("could not remove replaced shard file %s", redact_urls(old.location))
        shard = Shard(
            shardset_id=target.shardset.id,
            index=target.index,
            location=url,
            format=target.fmt,
            num_rows=stats.num_rows,
            size_bytes=size,
            uid_min=stats.uid_min,
            uid_max=stats.uid_max,
            created_at=time.time(),
        )
        if not target.shardset.is_main:
            self.indexes.save_run(target.shardset.id, shard, table.column(uid))
        self.catalog.replace_shards(target.shardset.id, [shard])
        return shard
