"""The catalog: datasets, shardsets, columns and shards, on SQLite or PostgreSQL through ADBC."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..protocol.errors import (
    DatasetAlreadyExists,
    DatasetNotFound,
    InvalidArgument,
    LavenderError,
    ShardsetNotFound,
)
from ..protocol.records import (
    ColumnOptions,
    Dataset,
    DatasetColumn,
    Shard,
    Shardset,
    UidValue,
    column_clashes,
)
from ._changes import IterationChanges
from ._database import DEFAULT_RECONNECT_SECONDS, Database, Transaction
from ._dialect import dialect_for
from ._iterations import IterationStore
from ._schema import MIGRATIONS, SCHEMA_VERSION
from ._target import parse_target

__all__ = ["Catalog", "new_id", "open_catalog"]


def new_id(prefix: str) -> str:
    """Return a fresh id such as ``ds-3f9a1c2b7d4e``: the prefix says what it names."""
    return f"{prefix}-{secrets.token_hex(6)}"


def _encode_uid(value: UidValue) -> str | None:
    return None if value is None else json.dumps(value)


def _decode_uid(text: str | None) -> UidValue:
    return None if text is None else json.loads(text)


class Catalog(IterationStore, IterationChanges):
    """The system of record: every other layer reads and writes state through this class.

    A SQLite file (WAL mode, the embedded default) or a PostgreSQL database, with the same
    SQL and the same migrations. One ADBC connection per thread (readers never block the
    writer); every write is one transaction, so a failed call changes nothing.

    Args:
        target: the SQLite file (a path, ``sqlite:///relative.db``, ``sqlite:////abs.db``,
            ``file:///abs.db``) or a ``postgresql://user@host:port/database`` URL.
        local_dir: for PostgreSQL, the folder of ``path`` (this machine's side files, such
            as uid indexes); default: a ``lavender-flight`` folder in the temp directory.
        reconnect_seconds: how long a call keeps reopening a dropped PostgreSQL connection
            before it raises ``StorageError``.

    Attributes:
        path: the SQLite file; for PostgreSQL ``<local_dir>/postgresql-<host>-<port>-<db>``,
            a local name beside which a server keeps side files (``<path>.indexes``).
        label: the catalog as shown to people (a PostgreSQL password is masked).
        backend: ``"sqlite"`` or ``"postgresql"``.

    Raises:
        InvalidArgument: ``target`` names no supported database.
        StorageError: the database cannot be opened (or stays unreachable).
        LavenderError: its schema is newer than this Lavender Flight.
    """

    def __init__(
        self,
        target: str | Path,
        *,
        local_dir: Path | None = None,
        reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
    ) -> None:
        parsed = parse_target(target)
        self._db = Database(dialect_for(parsed), reconnect_seconds)
        self.backend = parsed.backend
        self.label = parsed.label
        self.path = self._db.dialect.local_path(local_dir)
        try:
            self._db.transaction(self._migrate)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Catalog({self.label!r})"

    def _query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        return self._db.query(sql, params)

    def close(self) -> None:
        """Close every connection this catalog opened (in any thread)."""
        self._db.close()

    def _migrate(self, tx: Transaction) -> None:
        # under the catalog lock: servers starting together on one database migrate in turn
        tx.run("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        rows = tx.run("SELECT value FROM meta WHERE key = 'schema_version'")
        version = int(rows[0][0]) if rows else 0
        if version > SCHEMA_VERSION:
            raise LavenderError(
                f"catalog {self.label} has schema version {version}, newer than this "
                f"Lavender Flight ({SCHEMA_VERSION}): upgrade lavender-flight"
            )
        for statements in MIGRATIONS[version:]:
            for sql in statements:
                tx.run(sql)
        if version != SCHEMA_VERSION:
            tx.run("DELETE FROM meta WHERE key = 'schema_version'")
            tx.run(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    @property
    def schema_version(self) -> int:
        """The schema version of the open catalog."""
        rows = self._query("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(rows[0][0])

    # -- datasets ------------------------------------------------------------------------

    def create_dataset(self, name: str, uid_column_name: str) -> Dataset:
        """Create an empty dataset; names are unique."""
        if not name or len(name) > 256 or name != name.strip() or "/" in name:
            raise InvalidArgument(
                f"invalid dataset name {name!r}: 1-256 characters, no '/', no outer spaces"
            )
        if not uid_column_name:
            raise InvalidArgument("uid_column_name is required")
        dataset_id = new_id("ds")

        def insert(tx: Transaction) -> None:
            if tx.run("SELECT id FROM datasets WHERE name = ?", (name,)):
                raise DatasetAlreadyExists(f"a dataset named {name!r} exists already")
            tx.run(
                "INSERT INTO datasets (id, name, uid_column_name, created_at) VALUES (?, ?, ?, ?)",
                (dataset_id, name, uid_column_name, time.time()),
            )

        self._db.transaction(insert)
        return self.get_dataset(dataset_id=dataset_id)

    def get_dataset(self, dataset_id: str | None = None, name: str | None = None) -> Dataset:
        """Return a dataset with its shardsets, by id or by name."""
        if (dataset_id is None) == (name is None):
            raise InvalidArgument("give exactly one of dataset_id or name")
        column, value = ("id", dataset_id) if dataset_id is not None else ("name", name)
        rows = self._query(
            f"SELECT id, name, uid_column_name, created_at FROM datasets WHERE {column} = ?",
            (value,),
        )
        if not rows:
            raise DatasetNotFound(f"no dataset with {column} {value!r}")
        shardsets = self._shardsets_by_dataset(dataset_id=rows[0][0])
        return self._dataset(rows[0], shardsets)

    def list_datasets(self) -> list[Dataset]:
        """Return every dataset, oldest first."""
        rows = self._query(
            "SELECT id, name, uid_column_name, created_at FROM datasets ORDER BY created_at, id"
        )
        # three queries whatever the number of datasets: each costs a round trip on PostgreSQL
        shardsets = self._shardsets_by_dataset() if rows else {}
        return [self._dataset(row, shardsets) for row in rows]

    @staticmethod
    def _dataset(row: tuple[Any, ...], shardsets: Mapping[str, list[Shardset]]) -> Dataset:
        dataset_id, name, uid_column_name, created_at = row
        return Dataset(
            id=dataset_id,
            name=name,
            uid_column_name=uid_column_name,
            created_at=float(created_at),
            shardsets=shardsets.get(dataset_id, []),
        )

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset and everything the catalog knows of it (shard files stay)."""

        def delete(tx: Transaction) -> None:
            if not tx.run("SELECT id FROM datasets WHERE id = ?", (dataset_id,)):
                raise DatasetNotFound(f"no dataset with id {dataset_id!r}")
            iterations = "SELECT id FROM iterations WHERE dataset_id = ?"
            for table in ("iteration_ranks", "iteration_rank_states", "iteration_changes"):
                tx.run(f"DELETE FROM {table} WHERE iteration_id IN ({iterations})", (dataset_id,))
            tx.run("DELETE FROM iterations WHERE dataset_id = ?", (dataset_id,))
            shardsets = "SELECT id FROM shardsets WHERE dataset_id = ?"
            for table in ("shards", "shardset_columns"):
                tx.run(f"DELETE FROM {table} WHERE shardset_id IN ({shardsets})", (dataset_id,))
            tx.run("DELETE FROM shardsets WHERE dataset_id = ?", (dataset_id,))
            tx.run("DELETE FROM datasets WHERE id = ?", (dataset_id,))

        self._db.transaction(delete)

    # -- shardsets -----------------------------------------------------------------------

    def create_shardset(
        self,
        dataset_id: str,
        location: str,
        columns: Sequence[ColumnOptions],
        is_main: bool = False,
        shards: Sequence[Shard] = (),
        shardset_id: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Shardset:
        """Add a shardset (and the shards already found at its location) to a dataset.

        The first shardset of a dataset is its main one; ``is_main=True`` moves that role.
        Column names other than the uid must not clash with another shardset's.
        ``storage_options`` (JSON-serializable) are kept as given, secrets included: the
        records redact them whenever they are serialized.
        """
        shardset_id = shardset_id or new_id("ss")
        names = [column.name for column in columns]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"duplicate column names in {names}")
        try:
            options = json.dumps(dict(storage_options or {}), sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"storage_options must be JSON values: {exc}") from None

        def insert(tx: Transaction) -> None:
            dataset = tx.run("SELECT uid_column_name FROM datasets WHERE id = ?", (dataset_id,))
            if not dataset:
                raise DatasetNotFound(f"no dataset with id {dataset_id!r}")
            uid_column_name = dataset[0][0]
            if uid_column_name not in names:
                raise InvalidArgument(
                    f"the shardset's columns {names} lack the dataset's uid column "
                    f"{uid_column_name!r}: every shardset carries it to be joined by uid"
                )
            taken = tx.run(
                "SELECT c.name, c.shardset_id FROM shardset_columns c "
                "JOIN shardsets s ON s.id = c.shardset_id WHERE s.dataset_id = ?",
                (dataset_id,),
            )
            clashes = column_clashes(uid_column_name, names, taken)
            if clashes:
                raise InvalidArgument(
                    f"column names clash with other shardsets of the dataset: {', '.join(clashes)}"
                )
            siblings = "SELECT count(*) FROM shardsets WHERE dataset_id = ?"
            count = tx.run(siblings, (dataset_id,))[0][0]
            main = is_main or count == 0
            if main:
                tx.run("UPDATE shardsets SET is_main = 0 WHERE dataset_id = ?", (dataset_id,))
            tx.run(
                "INSERT INTO shardsets (id, dataset_id, location, is_main, position, created_at, "
                "storage_options) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (shardset_id, dataset_id, location, int(main), int(count), time.time(), options),
            )
            for position, column in enumerate(columns):
                tx.run(
                    "INSERT INTO shardset_columns (shardset_id, position, name, type, description) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (shardset_id, position, column.name, column.type_, column.description),
                )
            self._insert_shards(tx, shardset_id, shards)

        self._db.transaction(insert)
        return self.get_shardset(dataset_id, shardset_id)

    def get_shardset(self, dataset_id: str, shardset_id: str) -> Shardset:
        """Return one shardset of a dataset."""
        for shardset in self._shardsets_by_dataset(dataset_id, shardset_id).get(dataset_id, []):
            return shardset
        if not self._query("SELECT id FROM datasets WHERE id = ?", (dataset_id,)):
            raise DatasetNotFound(f"no dataset with id {dataset_id!r}")
        raise ShardsetNotFound(f"no shardset {shardset_id!r} in dataset {dataset_id!r}")

    def delete_shardset(self, dataset_id: str, shardset_id: str) -> None:
        """Remove a shardset from the catalog (its files stay); the next one becomes main."""
        shardset = self.get_shardset(dataset_id, shardset_id)

        def delete(tx: Transaction) -> None:
            tx.run("DELETE FROM shards WHERE shardset_id = ?", (shardset_id,))
            tx.run("DELETE FROM shardset_columns WHERE shardset_id = ?", (shardset_id,))
            tx.run("DELETE FROM shardsets WHERE id = ?", (shardset_id,))
            if shardset.is_main:
                rest = tx.run(
                    "SELECT id FROM shardsets WHERE dataset_id = ? ORDER BY position LIMIT 1",
                    (dataset_id,),
                )
                if rest:
                    tx.run("UPDATE shardsets SET is_main = 1 WHERE id = ?", (rest[0][0],))

        self._db.transaction(delete)

    def _shardsets_by_dataset(
        self, dataset_id: str | None = None, shardset_id: str | None = None
    ) -> dict[str, list[Shardset]]:
        """Shardsets with their columns and shard totals, by dataset id, in position order.

        Every dataset's when ``dataset_id`` is None; only ``shardset_id`` when given.
        """
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("s.dataset_id", dataset_id), ("s.id", shardset_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        columns: dict[str, list[DatasetColumn]] = {}
        for ss_id, name, type_, description in self._query(
            "SELECT c.shardset_id, c.name, c.type, c.description FROM shardset_columns c "
            f"JOIN shardsets s ON s.id = c.shardset_id{clause} ORDER BY c.shardset_id, c.position",
            params,
        ):
            columns.setdefault(ss_id, []).append(
                DatasetColumn(name=name, type_=type_, description=description, shardset_id=ss_id)
            )
        result: dict[str, list[Shardset]] = {}
        for row in self._query(
            "SELECT s.dataset_id, s.id, s.location, s.is_main, s.created_at, s.storage_options, "
            "count(h.shard_index), CAST(coalesce(sum(h.num_rows), 0) AS BIGINT), "
            "CAST(coalesce(sum(h.size_bytes), 0) AS BIGINT) "
            f"FROM shardsets s LEFT JOIN shards h ON h.shardset_id = s.id{clause} "
            "GROUP BY s.dataset_id, s.id, s.location, s.is_main, s.created_at, "
            "s.storage_options, s.position ORDER BY s.dataset_id, s.position",
            params,
        ):
            ds_id, ss_id, location, is_main, created_at, options, count, samples, size = row
            result.setdefault(ds_id, []).append(
                Shardset(
                    id=ss_id,
                    dataset_id=ds_id,
                    location=location,
                    is_main=bool(is_main),
                    columns=columns.get(ss_id, []),
                    shard_count=int(count),
                    total_samples=int(samples),
                    total_bytes=int(size),
                    created_at=float(created_at),
                    storage_options=json.loads(options or "{}"),
                )
            )
        return result

    # -- shards --------------------------------------------------------------------------

    def list_shards(self, shardset_id: str) -> list[Shard]:
        """Return the shards of a shardset in index order."""
        rows = self._query(
            "SELECT shard_index, location, format, num_rows, size_bytes, uid_min, uid_max, "
            "created_at FROM shards WHERE shardset_id = ? ORDER BY shard_index",
            (shardset_id,),
        )
        return [
            Shard(
                shardset_id=shardset_id,
                index=int(index),
                location=location,
                format=fmt,
                num_rows=int(num_rows),
                size_bytes=int(size_bytes),
                uid_min=_decode_uid(uid_min),
                uid_max=_decode_uid(uid_max),
                created_at=float(created_at),
            )
            for index, location, fmt, num_rows, size_bytes, uid_min, uid_max, created_at in rows
        ]

    def replace_shards(
        self, shardset_id: str, upsert: Sequence[Shard], remove: Sequence[int] = ()
    ) -> None:
        """Insert or replace the given shards and drop the given indices, all at once."""

        def replace(tx: Transaction) -> None:
            if not tx.run("SELECT id FROM shardsets WHERE id = ?", (shardset_id,)):
                raise ShardsetNotFound(f"no shardset {shardset_id!r}")
            for index in [*remove, *(shard.index for shard in upsert)]:
                tx.run(
                    "DELETE FROM shards WHERE shardset_id = ? AND shard_index = ?",
                    (shardset_id, index),
                )
            self._insert_shards(tx, shardset_id, upsert)

        self._db.transaction(replace)

    @staticmethod
    def _insert_shards(tx: Transaction, shardset_id: str, shards: Sequence[Shard]) -> None:
        for shard in shards:
            tx.run(
                "INSERT INTO shards (shardset_id, shard_index, location, format, num_rows, "
                "size_bytes, uid_min, uid_max, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    shardset_id,
                    shard.index,
                    shard.location,
                    shard.format,
                    shard.num_rows,
                    shard.size_bytes,
                    _encode_uid(shard.uid_min),
                    _encode_uid(shard.uid_max),
                    shard.created_at,
                ),
            )


def open_catalog(
    target: str | Path,
    *,
    local_dir: Path | None = None,
    reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
) -> Catalog:
    """Open the catalog a setting names: a SQLite file or a PostgreSQL URL.

    ``/data/catalog.db``, ``sqlite:///relative.db``, ``sqlite:////absolute.db`` and
    ``file:///absolute.db`` open SQLite; ``postgresql://user@host:port/database`` (or
    ``postgres://``) opens PostgreSQL. Any other ``scheme://`` is refused, never taken for a
    file name. Same as ``Catalog(target, ...)``.

    Raises:
        InvalidArgument: ``target`` names no supported database.
        StorageError: the database cannot be opened (or stays unreachable).
    """
    return Catalog(target, local_dir=local_dir, reconnect_seconds=reconnect_seconds)
