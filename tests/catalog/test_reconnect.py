"""PostgreSQL restarted (``pg_ctl restart``) or stopped under a running catalog: the catalog
reopens its connections on the next call, and says clearly which catalog is down when it
stays down. This module drives its own PostgreSQL so the session's one is never stopped."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import adbc_driver_manager
import pytest

from lavender_flight.catalog import Catalog, Database, Transaction, open_catalog
from lavender_flight.protocol.errors import StorageError
from lavender_flight.protocol.iterations import IterationPlan, IterationRecord, IterationSpec
from tests.catalog.test_contention import save_state
from tests.postgres import PostgresNotInstalled, PostgresServer

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-pw"  # trust authentication ignores it; it must never be shown
JOIN_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer.start()
    except PostgresNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.destroy()


@pytest.fixture
def url(own_postgres: PostgresServer) -> Iterator[str]:
    name = own_postgres.create_database()
    yield own_postgres.url(name, password=PASSWORD)
    if not (own_postgres.data / "postmaster.pid").exists():
        own_postgres.start_again()  # a failed test left it stopped
    own_postgres.drop_database(name)


def iteration(dataset_id: str) -> IterationRecord:
    return IterationRecord(
        id="it-1",
        dataset_id=dataset_id,
        spec=IterationSpec(dataset_id=dataset_id, batch_size=1),
        plan=IterationPlan(shards=[], seed=0),
        total=10,
        created_at=time.time(),
    )


def test_a_restart_is_invisible_to_the_next_calls(own_postgres: PostgresServer, url: str) -> None:
    catalog = open_catalog(url)
    dataset = catalog.create_dataset("before", "uid")
    catalog.create_iteration(iteration(dataset.id))
    # another thread holds a connection of its own: it must be reopened too
    other = threading.Thread(target=catalog.list_datasets)
    other.start()
    other.join(timeout=JOIN_TIMEOUT)

    own_postgres.restart()
    assert [d.name for d in catalog.list_datasets()] == ["before"]  # a read first

    own_postgres.restart()
    save_state(catalog, "it-1", 4)
    catalog.create_dataset("after", "uid")  # a write first after the restart: exactly once
    assert [d.name for d in catalog.list_datasets()] == ["before", "after"]
    assert [r.state for r in catalog.load_rank_states("it-1")] == ['{"acked": 4}']

    seen: list[list[str]] = []
    own_postgres.restart()
    other = threading.Thread(target=lambda: seen.append([d.name for d in catalog.list_datasets()]))
    other.start()
    other.join(timeout=JOIN_TIMEOUT)
    assert seen == [["before", "after"]]
    catalog.close()


def test_a_catalog_that_stays_down_is_named_in_a_clear_error(
    own_postgres: PostgresServer, url: str
) -> None:
    catalog = open_catalog(url, reconnect_seconds=2.0)
    catalog.create_dataset("kept", "uid")
    own_postgres.stop()
    try:
        for call in (catalog.list_datasets, lambda: catalog.create_dataset("lost", "uid")):
            started = time.monotonic()
            with pytest.raises(StorageError) as caught:
                call()
            elapsed = time.monotonic() - started
            message = str(caught.value)
            masked = url.replace(PASSWORD, "***")
            assert message.startswith(f"the catalog {masked} is unreachable: ")
            assert "Connection refused" in message and "check that the database server" in message
            assert PASSWORD not in message and "\n" not in message
            assert 1.5 < elapsed < 10.0, f"gave up after {elapsed:.1f}s"
    finally:
        own_postgres.start_again()
    # back up: the same catalog object works again, and the refused write never happened
    assert [d.name for d in catalog.list_datasets()] == ["kept"]
    catalog.close()


def test_opening_a_catalog_whose_server_is_down(own_postgres: PostgresServer, url: str) -> None:
    own_postgres.stop()
    try:
        with pytest.raises(StorageError, match=r"postgresql://postgres:\*\*\*@.* is unreachable"):
            open_catalog(url, reconnect_seconds=0.5)
    finally:
        own_postgres.start_again()
    catalog = open_catalog(url)  # a server starting while PostgreSQL comes up waits for it
    assert catalog.list_datasets() == []
    catalog.close()


def test_a_catalog_that_cannot_exist_fails_at_once(own_postgres: PostgresServer) -> None:
    missing = own_postgres.url("no_such_db", password=PASSWORD)
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        open_catalog(missing)
    assert time.monotonic() - started < 5.0  # not retried: waiting would not help
    message = str(caught.value)
    assert message.startswith(
        f"cannot open the catalog postgresql://postgres:***@127.0.0.1:{own_postgres.port}/"
        "no_such_db: "
    )
    assert 'database "no_such_db" does not exist' in message and PASSWORD not in message


def test_a_restart_between_statements_of_a_claim_reruns_it(
    own_postgres: PostgresServer, url: str
) -> None:
    """A transaction cut by the restart before its commit is run again on a new connection."""
    catalog: Catalog = open_catalog(url)
    runs: list[int] = []

    def body(tx: Transaction) -> None:
        runs.append(len(runs))
        tx.run("INSERT INTO meta (key, value) VALUES ('probe', ?)", (str(len(runs)),))
        if len(runs) == 1:
            own_postgres.restart()

    catalog._db.transaction(body)
    assert runs == [0, 1]
    assert catalog._query("SELECT value FROM meta WHERE key = 'probe'") == [("2",)]
    catalog.close()


def test_a_connection_lost_in_the_commit_is_not_run_again(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server may have committed before the answer was lost: running it again could
    apply it twice, so the caller is told, not retried."""
    catalog = open_catalog(url)
    real_execute = Database._execute

    def lost_answer(conn: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        if sql == "COMMIT":
            real_execute(conn, sql, params)
            raise adbc_driver_manager.OperationalError(
                "IO: [libpq] Failed to execute query 'COMMIT': server closed the connection "
                "unexpectedly",
                status_code=adbc_driver_manager.AdbcStatusCode.IO,
            )
        return real_execute(conn, sql, params)

    monkeypatch.setattr(Database, "_execute", staticmethod(lost_answer))
    with pytest.raises(StorageError, match="dropped while committing: the change may or may not"):
        catalog.create_dataset("once", "uid")
    monkeypatch.undo()
    assert [d.name for d in catalog.list_datasets()] == ["once"]
    catalog.close()
