"""What differs between SQLite and PostgreSQL, in one small place.

The catalog's SQL is written once, with ``?`` placeholders and portable types (``TEXT``,
``INTEGER``, ``BIGINT``, ``DOUBLE PRECISION``; booleans stored as ``0``/``1``). A ``Dialect``
turns it into what its driver takes and knows the rest: how a write transaction begins and
locks, how rows are locked (``for_update``), which errors mean "retry the transaction" and
which mean "the connection is gone".

=================  ==============================  =========================================
                   SQLite                          PostgreSQL
=================  ==============================  =========================================
placeholders       ``?``                           ``$1, $2, ...``
lock="catalog"     ``BEGIN IMMEDIATE``             ``BEGIN`` + ``pg_advisory_xact_lock``
lock="rows"        ``BEGIN IMMEDIATE``             ``BEGIN`` (READ COMMITTED; ``for_update``)
``for_update``     the ``SELECT`` as it is         ``SELECT ... FOR UPDATE [SKIP LOCKED]``
retry when         busy / locked                   serialization failure, deadlock
reconnect when     never (a file)                  the server closed or refused the connection
=================  ==============================  =========================================
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import adbc_driver_manager

from ..protocol.errors import StorageError
from ._target import CatalogTarget

__all__ = [
    "CATALOG_LOCK_KEY",
    "Dialect",
    "Lock",
    "PostgresDialect",
    "SQLiteDialect",
    "dialect_for",
    "to_numbered_placeholders",
]

Lock = Literal["catalog", "rows"]
"""How a write transaction locks.

``"catalog"``: one writer at a time on the whole catalog, like SQLite's ``BEGIN IMMEDIATE``
(what every catalog write uses; a body reads what it will change without racing anyone).
``"rows"``: only the rows the body locks with ``Dialect.for_update`` (PostgreSQL, READ
COMMITTED), so writers on different rows run at once; SQLite still takes its one write lock.
"""

CATALOG_LOCK_KEY = 0x6C6176656E646572  # "lavender": the advisory lock of lock="catalog"

_SQLITE_BUSY_TIMEOUT_MS = 30_000
_SQLITE_BUSY_WORDS = ("database is locked", "database is busy", "sqlite_busy")
_PG_CONFLICT_STATES = ("40001", "40P01")  # serialization failure, deadlock detected
_PG_CONFLICT_WORDS = ("could not serialize access", "deadlock detected")
# the server went away, or cannot take connections right now: reopen and try again
_PG_GONE_STATES = ("57P01", "57P02", "57P03")
_PG_GONE_WORDS = (
    "no connection to the server",
    "server closed the connection",
    "terminating connection",
    "connection refused",
    "could not connect",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "timeout expired",
    "connection reset",
    "broken pipe",
    "could not receive data",
    "could not send data",
    "eof detected",
    "ssl syscall error",
    "no such file or directory",  # a Unix socket that is not there (yet)
    "sorry, too many clients",
)


@functools.lru_cache(maxsize=1024)
def to_numbered_placeholders(sql: str) -> str:
    """``?`` placeholders as ``$1, $2, ...``; quoted text and identifiers are left alone."""
    out: list[str] = []
    number = 0
    quote = ""
    for char in sql:
        if quote:
            if char == quote:
                quote = ""
        elif char in ("'", '"'):
            quote = char
        elif char == "?":
            number += 1
            out.append(f"${number}")
            continue
        out.append(char)
    return "".join(out)


def _message(exc: BaseException) -> str:
    return str(exc).lower()


class Dialect:
    """The SQL and error rules of one backend; the one place the catalog's backends differ.

    Attributes:
        target: the parsed catalog setting.
        name: ``"sqlite"`` or ``"postgresql"``.
        conflict_retries: how often a transaction that hit a conflict (busy, serialization
            failure, deadlock) is run again before the error reaches the caller.
    """

    name: ClassVar[str] = ""
    conflict_retries: ClassVar[int] = 5

    def __init__(self, target: CatalogTarget) -> None:
        self.target = target

    @property
    def label(self) -> str:
        """The catalog as shown to people (a PostgreSQL password is masked)."""
        return self.target.label

    def connect(self) -> Any:
        """A new DB-API connection in autocommit mode, its session set up."""
        raise NotImplementedError

    def sql(self, text: str) -> str:
        """Portable SQL (``?`` placeholders) as this driver takes it."""
        return text

    def params(self, values: Sequence[Any] | None) -> tuple[Any, ...] | None:
        """Parameters as both backends store them: booleans become ``0``/``1``."""
        if values is None:
            return None
        return tuple(int(v) if isinstance(v, bool) else v for v in values)

    def begin(self, lock: Lock) -> tuple[str, ...]:
        """The statements that open a write transaction locking as ``lock`` says."""
        raise NotImplementedError

    def for_update(self, select: str, *, skip_locked: bool = False, of: Sequence[str] = ()) -> str:
        """``select`` locking the rows it returns until the transaction ends.

        Use it in a ``lock="rows"`` transaction. ``skip_locked`` leaves out rows another
        transaction holds (a work queue: each claimer gets different rows); ``of`` names the
        tables whose rows are locked when ``select`` joins several. On SQLite the whole
        database is locked by the transaction already, so the ``SELECT`` runs as it is.
        """
        raise NotImplementedError

    def upsert(self, table: str, columns: Sequence[str], key: Sequence[str]) -> str:
        """``INSERT`` of ``columns`` that updates the other columns when ``key`` exists.

        Both backends take ``ON CONFLICT (...) DO UPDATE SET c = excluded.c`` (SQLite 3.24+).
        """
        names = ", ".join(columns)
        marks = ", ".join("?" for _ in columns)
        rest = [c for c in columns if c not in key]
        action = (
            "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in rest)
            if rest
            else "DO NOTHING"
        )
        return (
            f"INSERT INTO {table} ({names}) VALUES ({marks}) "
            f"ON CONFLICT ({', '.join(key)}) {action}"
        )

    def is_conflict(self, exc: BaseException) -> bool:
        """The transaction lost a race and may simply be run again."""
        raise NotImplementedError

    def is_disconnect(self, exc: BaseException) -> bool:
        """The connection is gone or cannot be opened right now: reopen it and try again."""
        return False

    def never_ran(self, exc: BaseException) -> bool:
        """The failed statement cannot have run on the server (so a ``COMMIT`` did not commit)."""
        return False

    def plain_error(self, exc: BaseException) -> StorageError | None:
        """The one line to say when the database itself fails, instead of the SQL error.

        Its disk is full, its file is gone...; None for any other failure.
        """
        return None

    def conflict_backoff(self, attempt: int) -> float:
        """Seconds to wait before running a transaction again after its ``attempt``-th try."""
        return min(0.05 * 2**attempt, 1.0)

    def local_path(self, local_dir: Path | None) -> Path:
        """A local path named after the database, beside which a server keeps side files."""
        raise NotImplementedError


class SQLiteDialect(Dialect):
    """One SQLite file in WAL mode through ``adbc_driver_sqlite``."""

    name = "sqlite"

    opened: bool = False
    """The file was opened once: if it is not there any more, it was deleted meanwhile."""

    def connect(self) -> Any:
        """Open the file in autocommit mode, WAL, with a busy timeout and foreign keys on.

        Raises:
            StorageError: the file was there and is gone (SQLite would make an empty one).
        """
        import adbc_driver_sqlite.dbapi as sqlite_dbapi

        path = self.target.path
        if self.opened and not path.exists():
            raise StorageError(
                f"the catalog file {path} is gone (deleted or moved while the server ran): "
                "put it back, or restart the server on another catalog"
            )
        if not path.parent.is_dir():  # checked first: a mkdir would count as a disk write
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite_dbapi.connect(str(path), autocommit=True)
        self.opened = True
        try:
            for pragma in (
                f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}",
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=NORMAL",
                "PRAGMA foreign_keys=ON",
            ):
                self._pragma(conn, pragma)
        except BaseException:
            conn.close()
            raise
        return conn

    def _pragma(self, conn: Any, pragma: str) -> None:
        # switching to WAL takes the write lock: retry while another connection holds it
        for attempt in range(self.conflict_retries + 1):
            try:
                with conn.cursor() as cur:
                    cur.execute(pragma)
                return
            except adbc_driver_manager.Error as exc:
                if not self.is_conflict(exc) or attempt == self.conflict_retries:
                    raise
                time.sleep(self.conflict_backoff(attempt))

    def plain_error(self, exc: BaseException) -> StorageError | None:
        """A full disk, an unusable or vanished file, said plainly."""
        if not isinstance(exc, adbc_driver_manager.Error):
            return None
        text, path = _message(exc), self.target.path
        if "database or disk is full" in text or "disk is full" in text:
            return StorageError(
                f"the catalog's disk is full ({path}): free some space there; the change was "
                "not saved"
            )
        if "no such table" in text or not path.exists():
            return StorageError(
                f"the catalog file {path} is gone or was replaced by another file: put it "
                "back, or restart the server on another catalog"
            )
        if "disk i/o error" in text or "unable to open database file" in text:
            return StorageError(f"cannot use the catalog file {path}: {text.splitlines()[0]}")
        if "readonly database" in text or "read-only" in text:
            return StorageError(
                f"the catalog file {path} cannot be written (read-only): give the server's "
                "user write access to it and its folder"
            )
        return None

    def begin(self, lock: Lock) -> tuple[str, ...]:
        """``BEGIN IMMEDIATE``: the write lock of the file, whatever ``lock`` says."""
        return ("BEGIN IMMEDIATE",)

    def for_update(self, select: str, *, skip_locked: bool = False, of: Sequence[str] = ()) -> str:
        """``select`` as it is: ``BEGIN IMMEDIATE`` holds the whole file already."""
        return select

    def is_conflict(self, exc: BaseException) -> bool:
        """``database is locked`` / busy."""
        return isinstance(exc, adbc_driver_manager.Error) and any(
            word in _message(exc) for word in _SQLITE_BUSY_WORDS
        )

    def local_path(self, local_dir: Path | None) -> Path:
        """The SQLite file itself."""
        return self.target.path


class PostgresDialect(Dialect):
    """A PostgreSQL database through ``adbc_driver_postgresql`` (libpq)."""

    name = "postgresql"
    conflict_retries = 10

    def connect(self) -> Any:
        """Open a session in autocommit mode (READ COMMITTED statements)."""
        import adbc_driver_postgresql.dbapi as pg_dbapi

        return pg_dbapi.connect(self.connect_url(), autocommit=True)

    def connect_url(self) -> str:
        """The URL libpq opens: the setting plus a connect timeout and an application name.

        Both only when the setting does not give its own.
        """
        parts = urlsplit(self.target.location)
        given = {k for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
        extra = [
            f"{k}={v}"
            for k, v in (("connect_timeout", "10"), ("application_name", "lavender-flight"))
            if k not in given
        ]
        query = "&".join(q for q in [parts.query, *extra] if q)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))

    def sql(self, text: str) -> str:
        """``?`` placeholders as ``$n``."""
        return to_numbered_placeholders(text)

    def begin(self, lock: Lock) -> tuple[str, ...]:
        """``BEGIN``, then for ``"catalog"`` the catalog's transaction-scoped advisory lock.

        READ COMMITTED: each statement sees what committed before it, so a body that waited
        for the lock reads the latest state (a snapshot taken before the wait would not).
        """
        if lock == "catalog":
            return ("BEGIN", f"SELECT pg_advisory_xact_lock({CATALOG_LOCK_KEY})")
        return ("BEGIN",)

    def for_update(self, select: str, *, skip_locked: bool = False, of: Sequence[str] = ()) -> str:
        """``select FOR UPDATE [OF t, ...] [SKIP LOCKED]``."""
        clause = " FOR UPDATE"
        if of:
            clause += " OF " + ", ".join(of)
        if skip_locked:
            clause += " SKIP LOCKED"
        return select.rstrip().rstrip(";") + clause

    def is_conflict(self, exc: BaseException) -> bool:
        """Serialization failure (40001) or deadlock (40P01)."""
        if not isinstance(exc, adbc_driver_manager.Error):
            return False
        if getattr(exc, "sqlstate", None) in _PG_CONFLICT_STATES:
            return True
        return any(word in _message(exc) for word in _PG_CONFLICT_WORDS)

    def is_disconnect(self, exc: BaseException) -> bool:
        """Connection exceptions (08xxx), an administrator or crash shutdown, a refused connect."""
        if not isinstance(exc, adbc_driver_manager.Error):
            return False
        state = getattr(exc, "sqlstate", None) or ""
        if state.startswith("08") or state in _PG_GONE_STATES:
            return True
        return any(word in _message(exc) for word in _PG_GONE_WORDS)

    def never_ran(self, exc: BaseException) -> bool:
        """ADBC failed while preparing it: the server was never asked to run it.

        The driver prepares every statement, and waits for that, before it executes it.
        """
        return "failed to prepare query" in _message(exc)

    def conflict_backoff(self, attempt: int) -> float:
        """Short and growing: a serialization failure clears as soon as the other commits."""
        return min(0.01 * 2**attempt, 0.5)

    def local_path(self, local_dir: Path | None) -> Path:
        """``<local_dir>/postgresql-<host>-<port>-<database>`` (a name; nothing is written)."""
        import tempfile

        parts = urlsplit(self.target.location)
        host = (parts.hostname or "local").replace("/", "_")
        database = parts.path.lstrip("/") or (parts.username or "default")
        name = f"postgresql-{host}-{parts.port or 5432}-{database}".replace("/", "_")
        return (local_dir or Path(tempfile.gettempdir()) / "lavender-flight") / name


def dialect_for(target: CatalogTarget) -> Dialect:
    """The dialect of a parsed catalog setting."""
    if target.backend == "postgresql":
        return PostgresDialect(target)
    return SQLiteDialect(target)
