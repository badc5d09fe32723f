"""The catalog: datasets, shardsets, columns and shards in one SQLite file through ADBC."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import adbc_driver_manager
import adbc_driver_sqlite.dbapi as sqlite_dbapi

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
from ._iterations import IterationStore
from ._progress import ProgressRows
from ._schema import MIGRATIONS, SCHEMA_VERSION

__all__ = ["Catalog", "new_id"]

_BUSY_TIMEOUT_MS = 30_000
# on top of SQLite's busy timeout: a few more tries when a lock is still reported
_BUSY_RETRIES = 5
_BUSY_WORDS = ("database is locked", "database is busy", "sqlite_busy")


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, adbc_driver_manager.Error) and any(
        word in str(exc).lower() for word in _BUSY_WORDS
    )


def new_id(prefix: str) -> str:
    """Return a fresh id such as ``ds-3f9a1c2b7d4e``: the prefix says what it names."""
    return f"{prefix}-{secrets.token_hex(6)}"


def _encode_uid(value: UidValue) -> str | None:
    return None if value is None else json.dumps(value)


def _decode_uid(text: str | None) -> UidValue:
    return None if text is None else json.loads(text)


class Catalog(IterationStore, ProgressRows):
    """The system of record: every other layer reads and writes state through this class.

    One SQLite file in WAL mode, one ADBC connection per thread (readers never block the
    writer), writes in ``BEGIN IMMEDIATE`` transactions so a failed call changes nothing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    # -- connections ---------------------------------------------------------------------

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite_dbapi.connect(str(self.path), autocommit=True)
            for pragma in (
                f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}",
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=NORMAL",
                "PRAGMA foreign_keys=ON",
            ):
                self._retry_busy(conn, pragma)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @staticmethod
    def _run(conn: Any, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        # A fresh cursor per statement: an ADBC cursor keeps the last bound parameters.
        with conn.cursor() as cur:
            cur.execute(sql, params)
            try:
                return list(cur.fetchall())
            except adbc_driver_manager.Error:
                return []

    def _query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        return self._run(self._connection(), sql, params)

    def _retry_busy(self, conn: Any, sql: str) -> None:
        """Run a statement that takes the write lock; retry while another writer holds it.

        SQLite's busy timeout waits first; a bounded number of retries follow, so
        ``database is locked`` does not reach a user.
        """
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                self._run(conn, sql)
                return
            except adbc_driver_manager.Error as exc:
                if not _is_busy(exc) or attempt == _BUSY_RETRIES:
                    raise
                time.sleep(0.05 * 2**attempt)

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """A write transaction: everything inside commits together or not at all."""
        conn = self._connection()
        self._retry_busy(conn, "BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            self._run(conn, "ROLLBACK")
            raise
        try:
            self._retry_busy(conn, "COMMIT")
        except BaseException:
            self._run(conn, "ROLLBACK")
            raise

    def close(self) -> None:
        """Close every connection this catalog opened (in any thread)."""
        with self._lock:
            for conn in self._connections:
                try:
                    conn.close()
                except adbc_driver_manager.Error:
                    pass
            self._connections.clear()
        self._local = threading.local()

    def _migrate(self) -> None:
        conn = self._connection()
        self._run(conn, "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        with self._write() as conn:
            rows = self._run(conn, "SELECT value FROM meta WHERE key = 'schema_version'")
            version = int(rows[0][0]) if rows else 0
            if version > SCHEMA_VERSION:
                raise LavenderError(
                    f"catalog {self.path} has schema version {version}, newer than this "
                    f"Lavender Flight ({SCHEMA_VERSION}): upgrade lavender-flight"
                )
            for statements in MIGRATIONS[version:]:
                for sql in statements:
                    self._run(conn, sql)
            if version != SCHEMA_VERSION:
                self._run(conn, "DELETE FROM meta WHERE key = 'schema_version'")
                self._run(
                    conn,
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )

    @property
    def schema_version(self) -> int:
        """The schema version of the open catalog file."""
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
        with self._write() as conn:
            if self._run(conn, "SELECT id FROM datasets WHERE name = ?", (name,)):
                raise DatasetAlreadyExists(f"a dataset named {name!r} exists already")
            self._run(
                conn,
                "INSERT INTO datasets (id, name, uid_column_name, created_at) VALUES (?, ?, ?, ?)",
                (dataset_id, name, uid_column_name, time.time()),
            )
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
        return self._dataset(rows[0])

    def list_datasets(self) -> list[Dataset]:
        """Return every dataset, oldest first."""
        rows = self._query(
            "SELECT id, name, uid_column_name, created_at FROM datasets ORDER BY created_at, id"
        )
        return [self._dataset(row) for row in rows]

    def _dataset(self, row: tuple[Any, ...]) -> Dataset:
        dataset_id, name, uid_column_name, created_at = row
        return Dataset(
            id=dataset_id,
            name=name,
            uid_column_name=uid_column_name,
            created_at=float(created_at),
            shardsets=self._shardsets(dataset_id),
        )

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset and everything the catalog knows of it (shard files stay)."""
        with self._write() as conn:
            if not self._run(conn, "SELECT id FROM datasets WHERE id = ?", (dataset_id,)):
                raise DatasetNotFound(f"no dataset with id {dataset_id!r}")
            iterations = "SELECT id FROM iterations WHERE dataset_id = ?"
            for table in ("iteration_ranks", "iteration_rank_states"):
                self._run(
                    conn,
                    f"DELETE FROM {table} WHERE iteration_id IN ({iterations})",
                    (dataset_id,),
                )
            self._run(conn, "DELETE FROM iterations WHERE dataset_id = ?", (dataset_id,))
            shardsets = "SELECT id FROM shardsets WHERE dataset_id = ?"
            for table in ("shards", "shardset_columns"):
                self._run(
                    conn, f"DELETE FROM {table} WHERE shardset_id IN ({shardsets})", (dataset_id,)
                )
            self._run(conn, "DELETE FROM shardsets WHERE dataset_id = ?", (dataset_id,))
            self._run(conn, "DELETE FROM datasets WHERE id = ?", (dataset_id,))

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
        with self._write() as conn:
            dataset = self._run(
                conn, "SELECT uid_column_name FROM datasets WHERE id = ?", (dataset_id,)
            )
            if not dataset:
                raise DatasetNotFound(f"no dataset with id {dataset_id!r}")
            uid_column_name = dataset[0][0]
            if uid_column_name not in names:
                raise InvalidArgument(
                    f"the shardset's columns {names} lack the dataset's uid column "
                    f"{uid_column_name!r}: every shardset carries it to be joined by uid"
                )
            taken = self._run(
                conn,
                "SELECT c.name, c.shardset_id FROM shardset_columns c "
                "JOIN shardsets s ON s.id = c.shardset_id WHERE s.dataset_id = ?",
                (dataset_id,),
            )
            clashes = column_clashes(uid_column_name, names, taken)
            if clashes:
                raise InvalidArgument(
                    f"column names clash with other shardsets of the dataset: {', '.join(clashes)}"
                )
            count = self._run(
                conn, "SELECT count(*) FROM shardsets WHERE dataset_id = ?", (dataset_id,)
            )[0][0]
            main = is_main or count == 0
            if main:
                self._run(
                    conn, "UPDATE shardsets SET is_main = 0 WHERE dataset_id = ?", (dataset_id,)
                )
            self._run(
                conn,
                "INSERT INTO shardsets (id, dataset_id, location, is_main, position, created_at, "
                "storage_options) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (shardset_id, dataset_id, location, int(main), int(count), time.time(), options),
            )
            for position, column in enumerate(columns):
                self._run(
                    conn,
                    "INSERT INTO shardset_columns (shardset_id, position, name, type, description) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (shardset_id, position, column.name, column.type_, column.description),
                )
            self._insert_shards(conn, shardset_id, shards)
        return self.get_shardset(dataset_id, shardset_id)

    def get_shardset(self, dataset_id: str, shardset_id: str) -> Shardset:
        """Return one shardset of a dataset."""
        for shardset in self._shardsets(dataset_id, shardset_id):
            return shardset
        if not self._query("SELECT id FROM datasets WHERE id = ?", (dataset_id,)):
            raise DatasetNotFound(f"no dataset with id {dataset_id!r}")
        raise ShardsetNotFound(f"no shardset {shardset_id!r} in dataset {dataset_id!r}")

    def delete_shardset(self, dataset_id: str, shardset_id: str) -> None:
        """Remove a shardset from the catalog (its files stay); the next one becomes main."""
        shardset = self.get_shardset(dataset_id, shardset_id)
        with self._write() as conn:
            self._run(conn, "DELETE FROM shards WHERE shardset_id = ?", (shardset_id,))
            self._run(conn, "DELETE FROM shardset_columns WHERE shardset_id = ?", (shardset_id,))
            self._run(conn, "DELETE FROM shardsets WHERE id = ?", (shardset_id,))
            if shardset.is_main:
                rest = self._run(
                    conn,
                    "SELECT id FROM shardsets WHERE dataset_id = ? ORDER BY position LIMIT 1",
                    (dataset_id,),
                )
                if rest:
                    self._run(conn, "UPDATE shardsets SET is_main = 1 WHERE id = ?", (rest[0][0],))

    def _shardsets(self, dataset_id: str, shardset_id: str | None = None) -> list[Shardset]:
        sql = (
            "SELECT s.id, s.location, s.is_main, s.created_at, s.storage_options, "
            "count(h.shard_index), coalesce(sum(h.num_rows), 0), coalesce(sum(h.size_bytes), 0) "
            "FROM shardsets s LEFT JOIN shards h ON h.shardset_id = s.id "
            "WHERE s.dataset_id = ?"
        )
        params: list[Any] = [dataset_id]
        if shardset_id is not None:
            sql += " AND s.id = ?"
            params.append(shardset_id)
        sql += (
            " GROUP BY s.id, s.location, s.is_main, s.created_at, s.storage_options, s.position"
            " ORDER BY s.position"
        )
        result = []
        for row in self._query(sql, params):
            ss_id, location, is_main, created_at, options, shard_count, samples, size = row
            columns = [
                DatasetColumn(name=name, type_=type_, description=description, shardset_id=ss_id)
                for name, type_, description in self._query(
                    "SELECT name, type, description FROM shardset_columns "
                    "WHERE shardset_id = ? ORDER BY position",
                    (ss_id,),
                )
            ]
            result.append(
                Shardset(
                    id=ss_id,
                    dataset_id=dataset_id,
                    location=location,
                    is_main=bool(is_main),
                    columns=columns,
                    shard_count=int(shard_count),
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
        with self._write() as conn:
            if not self._run(conn, "SELECT id FROM shardsets WHERE id = ?", (shardset_id,)):
                raise ShardsetNotFound(f"no shardset {shardset_id!r}")
            for index in [*remove, *(shard.index for shard in upsert)]:
                self._run(
                    conn,
                    "DELETE FROM shards WHERE shardset_id = ? AND shard_index = ?",
                    (shardset_id, index),
                )
            self._insert_shards(conn, shardset_id, upsert)

    def _insert_shards(self, conn: Any, shardset_id: str, shards: Sequence[Shard]) -> None:
        for shard in shards:
            self._run(
                conn,
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
