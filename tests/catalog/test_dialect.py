"""The one place the backends differ: its SQL text, and the same transactions run for real on
SQLite and PostgreSQL (row locks, swallowed failures, servers migrating together)."""

from __future__ import annotations

import threading
from collections import Counter

import adbc_driver_manager
import pytest

from lavender_flight.catalog import (
    SCHEMA_VERSION,
    Catalog,
    PostgresDialect,
    SQLiteDialect,
    Transaction,
    open_catalog,
    parse_target,
)
from lavender_flight.catalog._database import MAX_IDLE_CONNECTIONS
from lavender_flight.catalog._dialect import CATALOG_LOCK_KEY, to_numbered_placeholders

JOIN_TIMEOUT = 60.0
SQLITE = SQLiteDialect(parse_target("/tmp/x.db"))
POSTGRES = PostgresDialect(parse_target("postgresql://lf:pw@db:5433/cat"))


def test_placeholders_are_numbered_outside_quotes() -> None:
    sql = "SELECT a FROM t WHERE b = ? AND c = '?' AND \"d?\" = ? AND e IN (?, ?)"
    assert to_numbered_placeholders(sql) == (
        "SELECT a FROM t WHERE b = $1 AND c = '?' AND \"d?\" = $2 AND e IN ($3, $4)"
    )
    assert to_numbered_placeholders("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', $1"
    assert SQLITE.sql(sql) == sql


def test_transaction_starts_and_row_locks() -> None:
    assert SQLITE.begin("catalog") == SQLITE.begin("rows") == ("BEGIN IMMEDIATE",)
    assert POSTGRES.begin("catalog") == (
        "BEGIN",
        f"SELECT pg_advisory_xact_lock({CATALOG_LOCK_KEY})",
    )
    assert POSTGRES.begin("rows") == ("BEGIN",)
    select = "SELECT id FROM work WHERE owner IS NULL ORDER BY id LIMIT 2"
    assert SQLITE.for_update(select, skip_locked=True) == select
    assert POSTGRES.for_update(select) == select + " FOR UPDATE"
    assert POSTGRES.for_update(select + ";", skip_locked=True, of=["work"]) == (
        select + " FOR UPDATE OF work SKIP LOCKED"
    )


def test_upsert_and_parameters_are_the_same_on_both() -> None:
    sql = SQLITE.upsert("ranks", ["iteration_id", "rank", "acked"], key=["iteration_id", "rank"])
    assert sql == (
        "INSERT INTO ranks (iteration_id, rank, acked) VALUES (?, ?, ?) "
        "ON CONFLICT (iteration_id, rank) DO UPDATE SET acked = excluded.acked"
    )
    assert POSTGRES.upsert("ranks", ["a", "b"], key=["a", "b"]).endswith("DO NOTHING")
    assert SQLITE.params((True, False, 3, None, "x")) == POSTGRES.params(
        (True, False, 3, None, "x")
    )
    assert POSTGRES.params((True, False, 3, None, "x")) == (1, 0, 3, None, "x")


def test_which_errors_are_retried_and_which_reopen() -> None:
    def error(message: str, sqlstate: str | None = None) -> adbc_driver_manager.Error:
        return adbc_driver_manager.OperationalError(
            message, status_code=adbc_driver_manager.AdbcStatusCode.IO, sqlstate=sqlstate
        )

    assert SQLITE.is_conflict(error("IO: database is locked"))
    assert not SQLITE.is_disconnect(error("IO: database is locked"))
    assert POSTGRES.is_conflict(error("ERROR: could not serialize access", "40001"))
    assert POSTGRES.is_conflict(error("ERROR: deadlock detected", "40P01"))
    assert not POSTGRES.is_conflict(error("ERROR: duplicate key value", "23505"))
    # what ADBC says when PostgreSQL restarted under an open session, and while it is down
    assert POSTGRES.is_disconnect(
        error("IO: Failed to prepare query: FATAL:  terminating connection due to administrator")
    )
    assert POSTGRES.is_disconnect(error("IO: Failed to prepare query: no connection to the server"))
    assert POSTGRES.is_disconnect(error('IO: [libpq] Failed to connect: ... "127.0.0.1", port '
                                        "5432 failed: Connection refused"))  # fmt: skip
    assert not POSTGRES.is_disconnect(error('FATAL:  database "nope" does not exist'))
    assert not POSTGRES.is_disconnect(ValueError("no connection to the server"))


def test_postgres_connections_carry_a_timeout_and_a_name_unless_given() -> None:
    assert POSTGRES.connect_url() == (
        "postgresql://lf:pw@db:5433/cat?connect_timeout=10&application_name=lavender-flight"
    )
    own = PostgresDialect(parse_target("postgresql://db/cat?connect_timeout=3"))
    assert (
        own.connect_url()
        == "postgresql://db/cat?connect_timeout=3&application_name=lavender-flight"
    )


# -- on the real databases ----------------------------------------------------------------


def make_work_table(catalog: Catalog, items: int) -> None:
    def create(tx: Transaction) -> None:
        tx.run("CREATE TABLE work (id INTEGER PRIMARY KEY, owner TEXT, done INTEGER NOT NULL)")
        for number in range(items):
            tx.run("INSERT INTO work (id, owner, done) VALUES (?, NULL, ?)", (number, False))

    catalog._db.transaction(create)


def claim(catalog: Catalog, owner: str, count: int) -> list[int]:
    """The claim the iteration state will make: lock free rows, skipping locked ones, take them."""

    def body(tx: Transaction) -> list[int]:
        rows = tx.run(
            tx.dialect.for_update(
                "SELECT id FROM work WHERE owner IS NULL ORDER BY id LIMIT ?", skip_locked=True
            ),
            (count,),
        )
        for (number,) in rows:
            tx.run("UPDATE work SET owner = ? WHERE id = ?", (owner, number))
        return [int(number) for (number,) in rows]

    return catalog._db.transaction(body, lock="rows")


def test_claims_under_row_locks_hand_out_every_row_exactly_once(catalog: Catalog) -> None:
    make_work_table(catalog, 120)
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker(name: str) -> None:
        try:
            start.wait(timeout=JOIN_TIMEOUT)
            mine: list[int] = []
            while taken := claim(catalog, name, 4):
                mine += taken
            got[name] = mine
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT)
    assert not errors, errors
    claimed = Counter(n for mine in got.values() for n in mine)
    assert sorted(claimed) == list(range(120)) and set(claimed.values()) == {1}
    owners = catalog._query("SELECT owner, count(*) FROM work GROUP BY owner ORDER BY owner")
    assert {owner: int(n) for owner, n in owners} == {k: len(v) for k, v in got.items() if v}


def test_a_locked_row_is_skipped_by_another_claimer(postgres_url: str) -> None:
    """PostgreSQL only: SQLite has no row locks (its one write lock would make B wait for A)."""
    catalog = open_catalog(postgres_url)
    make_work_table(catalog, 3)
    holding, release = threading.Event(), threading.Event()
    first: list[int] = []

    def hold_row_zero(tx: Transaction) -> None:
        first.extend(
            n for (n,) in tx.run(tx.dialect.for_update("SELECT id FROM work WHERE id = 0"))
        )
        holding.set()
        assert release.wait(timeout=JOIN_TIMEOUT)

    holder = threading.Thread(target=lambda: catalog._db.transaction(hold_row_zero, lock="rows"))
    holder.start()
    try:
        assert holding.wait(timeout=JOIN_TIMEOUT)
        assert claim(catalog, "other", 2) == [1, 2]  # row 0 is held: skipped, not waited for
    finally:
        release.set()
        holder.join(timeout=JOIN_TIMEOUT)
    assert first == [0]
    assert claim(catalog, "later", 5) == [0]
    catalog.close()


def test_a_swallowed_failure_fails_the_whole_transaction(catalog: Catalog) -> None:
    """PostgreSQL aborts a transaction at its first failed statement; SQLite is made to match."""
    make_work_table(catalog, 1)

    def body(tx: Transaction) -> str:
        tx.run("UPDATE work SET owner = 'kept?' WHERE id = 0")
        try:
            tx.run("INSERT INTO work (id, owner, done) VALUES (0, 'twice', 0)")
        except adbc_driver_manager.IntegrityError:
            pass
        return "carried on"

    with pytest.raises(adbc_driver_manager.IntegrityError):
        catalog._db.transaction(body)
    assert catalog._query("SELECT owner FROM work") == [(None,)]


def test_servers_starting_together_migrate_once(catalog_target: str) -> None:
    """Several servers open one new catalog at the same moment: each finds it migrated."""
    opened: list[Catalog] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def open_one() -> None:
        try:
            start.wait(timeout=JOIN_TIMEOUT)
            opened.append(open_catalog(catalog_target))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT)
    try:
        assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
        assert [c.schema_version for c in opened] == [SCHEMA_VERSION] * 6
        assert opened[0]._query("SELECT key, value FROM meta") == [
            ("schema_version", str(SCHEMA_VERSION))
        ]
        opened[0].create_dataset("after", "uid")
        assert [d.name for d in opened[-1].list_datasets()] == ["after"]
    finally:
        for catalog in opened:
            catalog.close()


def test_connections_are_pooled_not_kept_per_thread(catalog: Catalog) -> None:
    # a server's gRPC threads come and go: a connection per thread outlived them all (1,158
    # connections after 30 small iterations, 10 MB each); the pool keeps a few for reuse
    def use(number: int) -> None:
        catalog.list_datasets()
        catalog.create_dataset(f"t{number}", "uid")

    for number in range(40):  # one short-lived thread after another
        thread = threading.Thread(target=use, args=(number,))
        thread.start()
        thread.join(timeout=JOIN_TIMEOUT)
    assert len(catalog._db._connections) == 1
    assert len(catalog.list_datasets()) == 40

    # users at the same time each get their own connection, and give it back
    held = [catalog._db.connection() for _ in range(MAX_IDLE_CONNECTIONS + 3)]
    assert len({id(c) for c in held}) == len(held)
    for conn in held:
        catalog._db.release(conn)
    assert len(catalog._db._connections) == MAX_IDLE_CONNECTIONS  # the extra ones closed
