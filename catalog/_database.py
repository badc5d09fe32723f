"""Connections to the catalog's database: one per thread, reopened when it drops.

Reads run one statement each in autocommit mode. Writes run as a *transaction body*, a
function of a ``Transaction`` that may run more than once: it is run again when it lost a
race (SQLite busy, PostgreSQL serialization failure or deadlock) and when the connection
dropped before the commit (PostgreSQL restarted), so a body must do nothing but SQL.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import adbc_driver_manager
import pyarrow as pa
from adbc_driver_manager._reader import AdbcRecordBatchReader

from ..protocol.errors import StorageError
from ._dialect import Dialect, Lock

MAX_IDLE_CONNECTIONS = 8
"""Connections kept open for reuse; more are opened when more threads need one at once."""
MAX_STATEMENTS = 64
"""Prepared statements kept per connection (a cursor per SQL text; past it, all closed)."""

__all__ = ["DEFAULT_RECONNECT_SECONDS", "Database", "Transaction"]

DEFAULT_RECONNECT_SECONDS = 15.0
_RECONNECT_FIRST_WAIT = 0.05
_RECONNECT_MAX_WAIT = 1.0

T = TypeVar("T")


def _reason(exc: BaseException) -> str:
    """The driver's message in one line, without ADBC's prefixes and the query echo."""
    text = str(exc).split("\n\nQuery was:", 1)[0]
    for prefix in ("IO: ", "[libpq] ", "Failed to connect: ", "Failed to prepare query: "):
        text = text.removeprefix(prefix)
    return " ".join(text.split()).rstrip(".") or type(exc).__name__


_PARAM_TYPES: dict[type, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bytes: pa.binary(),
    type(None): pa.null(),
}


class _Statement:
    """One SQL text prepared on one connection, run again with new parameters.

    Run through ADBC's statement API rather than a DB-API cursor: the cursor builds its
    parameters into an Arrow batch by inference and wraps every call for cancelling, which
    made a one-row read 221 us against 92 here, and a claim's transaction (five statements)
    571 us against 317 (SQLite; ``sqlite3`` itself takes 268 for the same transaction).
    The parameters are bound as one struct array of types known from the Python values
    (the types are kept per shape), and the last batch is bound again when the same
    parameters come again (the selects of a rank's row in claim after claim).
    """

    __slots__ = ("_bound", "_last", "_stmt", "_types")

    def __init__(self, raw: Any, sql: str) -> None:
        stmt = adbc_driver_manager.AdbcStatement(raw.adbc_connection)
        try:
            stmt.set_sql_query(sql)
            try:
                stmt.prepare()
            except adbc_driver_manager.NotSupportedError:  # not every driver prepares
                pass
        except BaseException:
            stmt.close()
            raise
        self._stmt = stmt
        self._last: tuple[Any, ...] | None = None
        self._bound: Any = None
        self._types: dict[tuple[type, ...], pa.StructType] = {}

    def _batch(self, params: tuple[Any, ...]) -> Any:
        shape = tuple(map(type, params))
        kind = self._types.get(shape)
        if kind is None:
            fields = []
            for number, value in enumerate(params):
                known = _PARAM_TYPES.get(type(value))
                fields.append((str(number), known if known is not None else pa.scalar(value).type))
            kind = self._types[shape] = pa.struct(fields)
        return pa.RecordBatch.from_struct_array(pa.array([params], kind))

    def run(self, params: Sequence[Any] | None) -> list[tuple[Any, ...]]:
        """Bind ``params`` (positional), run, and return the rows (none without any)."""
        if params:
            values = tuple(params)
            if values != self._last:
                self._bound, self._last = self._batch(values), values
            self._stmt.bind(self._bound)
        handle, _ = self._stmt.execute_query()
        # ADBC's reader: a failure while reading comes as the driver's error, as from execute
        reader = AdbcRecordBatchReader._import_from_c(handle.address)
        try:
            table = reader.read_all()
        finally:
            reader.close()
        return list(zip(*(column.to_pylist() for column in table.columns), strict=True))

    def close(self) -> None:
        """Release the statement (its connection may be gone: nothing to release then)."""
        try:
            self._stmt.close()
        except Exception:
            pass


class _Connection:
    """A connection of the pool, and its prepared statements by SQL text."""

    __slots__ = ("_statements", "raw")

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self._statements: dict[str, _Statement] = {}

    def statement(self, sql: str) -> _Statement:
        """The statement for ``sql``: prepared once, run again with new parameters.

        Preparing a statement anew for every run was a third of its cost (SQLite: a state
        row read 201 us, 132 reused; an update 244 us, 135). A connection serves one thread
        at a time, so its statements do too.
        """
        found = self._statements.get(sql)
        if found is None:
            if len(self._statements) >= MAX_STATEMENTS:
                self.close_statements()
            found = self._statements[sql] = _Statement(self.raw, sql)
        return found

    def forget(self, sql: str) -> None:
        """Close the statement of ``sql`` (one that failed: a fresh one next time)."""
        found = self._statements.pop(sql, None)
        if found is not None:
            found.close()

    def close_statements(self) -> None:
        """Close every statement kept (ADBC refuses to close a connection with open ones)."""
        kept, self._statements = self._statements, {}
        for found in kept.values():
            found.close()

    def close(self) -> None:
        """Close the statements, then the connection."""
        self.close_statements()
        self.raw.close()


class Transaction:
    """An open write transaction: what a transaction body is given.

    Attributes:
        dialect: the backend's rules (``dialect.for_update(...)`` to lock rows).
    """

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self._conn = conn
        self.dialect = dialect
        self.failed: BaseException | None = None

    def run(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one portable statement (``?`` placeholders) and return its rows."""
        try:
            return Database._execute(self._conn, self.dialect.sql(sql), self.dialect.params(params))
        except BaseException as exc:
            # PostgreSQL ends a transaction at its first failed statement: so do we, on both
            self.failed = self.failed or exc
            raise


class Database:
    """The connections of one catalog database and the way statements run on them.

    Args:
        dialect: the backend.
        reconnect_seconds: how long a call keeps reopening a dropped or refused connection
            before it raises ``StorageError`` naming the catalog.
    """

    def __init__(
        self, dialect: Dialect, reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS
    ) -> None:
        self.dialect = dialect
        self.reconnect_seconds = reconnect_seconds
        self._connections: list[Any] = []
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------

    @staticmethod
    def _execute(
        conn: _Connection, sql: str, params: Sequence[Any] | None = None
    ) -> list[tuple[Any, ...]]:
        # Rows are read as one Arrow table, column by column: the DB-API's row iterator
        # spends Python on every value (a 40-row shard listing: 500 us against 95 us).
        try:
            return conn.statement(sql).run(params)
        except BaseException:
            conn.forget(sql)  # whatever state it is left in: a fresh one next time
            raise

    def connection(self) -> _Connection:
        """A connection of the pool for one statement or transaction (``release`` it after).

        Connections are reused by any thread, one user at a time: a server's gRPC threads
        come and go, and a connection per thread would outlive them all.

        Raises:
            StorageError: the database refuses the connection for good (no such database,
                wrong credentials).
            adbc_driver_manager.Error: the server cannot be reached right now
                (``dialect.is_disconnect`` says so; callers retry).
        """
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            conn = _Connection(self.dialect.connect())
        except adbc_driver_manager.Error as exc:
            if self.dialect.is_disconnect(exc):
                raise
            raise StorageError(
                f"cannot open the catalog {self.dialect.label}: "
                f"{self.dialect.target.scrub(_reason(exc))}"
            ) from None
        with self._lock:
            self._connections.append(conn)
        return conn

    def release(self, conn: Any) -> None:
        """Give a connection back to the pool (closed when enough are idle already)."""
        with self._lock:
            if conn not in self._connections:
                return  # discarded, or the database was closed meanwhile
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        self._discard(conn)

    def _discard(self, conn: Any) -> None:
        """Forget a connection (dropped, or one too many); the next call opens a new one."""
        with self._lock:
            if conn in self._idle:
                self._idle.remove(conn)
            if conn in self._connections:
                self._connections.remove(conn)
        try:
            conn.close()
        except Exception:  # it is gone already: nothing to release
            pass

    def _wait_to_reconnect(self, exc: BaseException, started: float, attempt: int) -> None:
        """Sleep before the next reopening, or raise when the catalog stayed away too long."""
        waited = time.monotonic() - started
        if waited >= self.reconnect_seconds:
            raise StorageError(
                f"the catalog {self.dialect.label} is unreachable: "
                f"{self.dialect.target.scrub(_reason(exc))} (tried for {waited:.1f} s): "
                "check that the database server is running and reachable"
            ) from None
        pause = min(_RECONNECT_FIRST_WAIT * 2**attempt, _RECONNECT_MAX_WAIT)
        time.sleep(min(pause, max(self.reconnect_seconds - waited, 0.0)))

    def close(self) -> None:
        """Close every connection opened (in any thread); a later call opens new ones."""
        with self._lock:
            for conn in self._connections:
                try:
                    conn.close()
                except adbc_driver_manager.Error:
                    pass
            self._connections.clear()
            self._idle.clear()

    # -- statements ----------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one portable statement on its own (autocommit) and return its rows.

        A dropped connection is reopened and the statement run again.
        """
        sql, values = self.dialect.sql(sql), self.dialect.params(params)
        started: float | None = None
        attempt = 0
        while True:
            conn = None
            try:
                conn = self.connection()
                rows = self._execute(conn, sql, values)
            except adbc_driver_manager.Error as exc:
                if conn is not None:
                    if not self.dialect.is_disconnect(exc):
                        self.release(conn)
                        plain = self.dialect.plain_error(exc)
                        if plain is not None:
                            raise plain from None
                        raise
                    self._discard(conn)
                elif not self.dialect.is_disconnect(exc):
                    raise
                started = time.monotonic() if started is None else started
                self._wait_to_reconnect(exc, started, attempt)
                attempt += 1
                continue
            except BaseException:
                if conn is not None:
                    self.release(conn)
                raise
            self.release(conn)
            return rows

    def transaction(self, body: Callable[[Transaction], T], lock: Lock = "catalog") -> T:
        """Run ``body`` in a write transaction and commit; return what it returns.

        Everything ``body`` ran commits together or not at all. ``body`` runs again after a
        conflict (bounded by ``dialect.conflict_retries``, then the driver's error is raised)
        and after the connection dropped before the commit took effect (for up to
        ``reconnect_seconds``, then ``StorageError``).

        Raises:
            StorageError: the catalog stayed unreachable, or the connection dropped during
                the commit (whether it was saved is unknown).
        """
        conflicts = 0
        started: float | None = None
        drops = 0
        while True:
            conn = None
            committing = False
            try:
                conn = self.connection()
                tx = Transaction(conn, self.dialect)
                for statement in self.dialect.begin(lock):
                    tx.run(statement)
                result = body(tx)
                if tx.failed is not None:  # the body caught a failed statement
                    raise tx.failed
                committing = True
                tx.run("COMMIT")
                self.release(conn)
                return result
            except BaseException as exc:
                dropped = isinstance(exc, adbc_driver_manager.Error) and self.dialect.is_disconnect(
                    exc
                )
                if conn is not None:
                    self._rollback(conn)
                    if dropped:
                        self._discard(conn)
                    else:
                        self.release(conn)
                if dropped:
                    if committing and not self.dialect.never_ran(exc):
                        raise StorageError(
                            f"the connection to the catalog {self.dialect.label} dropped "
                            "while committing: the change may or may not be saved; check, "
                            "then retry"
                        ) from None
                    started = time.monotonic() if started is None else started
                    self._wait_to_reconnect(exc, started, drops)
                    drops += 1
                    continue
                if self.dialect.is_conflict(exc) and conflicts < self.dialect.conflict_retries:
                    time.sleep(self.dialect.conflict_backoff(conflicts) * random.uniform(0.5, 1.5))
                    conflicts += 1
                    continue
                plain = self.dialect.plain_error(exc)
                if plain is not None:
                    raise plain from None
                raise

    def _rollback(self, conn: Any) -> None:
        try:
            self._execute(conn, "ROLLBACK")
        except adbc_driver_manager.Error:
            pass  # no transaction was open (BEGIN failed), or the connection is gone
