"""A catalog written from many threads and from two ``Catalog`` objects on one database at
once (SQLite file and PostgreSQL): every write lands, and ``database is locked`` (or a
serialization failure) never reaches the caller."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import adbc_driver_manager
import pytest

from lavender_flight.catalog import Catalog, Database, open_catalog
from lavender_flight.catalog._progress import RankRow
from lavender_flight.protocol.iterations import IterationPlan, IterationRecord, IterationSpec

THREADS = 8
WRITES = 25
JOIN_TIMEOUT = 60.0


def save_state(catalog: Catalog, iteration_id: str, acked: int) -> None:
    """Replace rank 0's state row of epoch 0 (the catalog stores it as it is given)."""

    def change(rows: dict[int, RankRow]) -> None:
        rows[0].set(json.dumps({"acked": acked}), None, ())

    catalog.update_rank_states(iteration_id, 0, [0], change)


def test_concurrent_writes_from_threads_and_two_catalogs_all_land(catalog_target: str) -> None:
    path = catalog_target
    first = open_catalog(path)
    home = first.create_dataset("home", "uid")
    for number in range(THREADS):
        first.create_iteration(
            IterationRecord(
                id=f"it-{number}",
                dataset_id=home.id,
                spec=IterationSpec(dataset_id=home.id, batch_size=1),
                plan=IterationPlan(shards=[], seed=0),
                total=WRITES,
                created_at=time.time(),
            )
        )
    errors: list[BaseException] = []
    opened: list[Catalog] = []
    start = threading.Barrier(THREADS)

    def work(number: int) -> None:
        try:
            start.wait(timeout=JOIN_TIMEOUT)
            # half the threads open their own Catalog on the file while the others write
            catalog = first if number % 2 else open_catalog(path)
            if catalog is not first:
                opened.append(catalog)
            for index in range(WRITES):
                dataset = catalog.create_dataset(f"d-{number}-{index}", "uid")
                save_state(catalog, f"it-{number}", index + 1)
                if index % 5 == 0:
                    catalog.delete_dataset(dataset.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
    check = open_catalog(path)
    names = {d.name for d in check.list_datasets()} - {"home"}
    progress = [check.load_rank_states(f"it-{n}")[0].state for n in range(THREADS)]
    check.close()
    assert progress == [json.dumps({"acked": WRITES})] * THREADS
    expected = {f"d-{n}-{i}" for n in range(THREADS) for i in range(WRITES) if i % 5 != 0}
    assert names == expected
    for catalog in [first, *opened]:
        catalog.close()


# Where each backend reports a lost race, and what it says: SQLite cannot take its write lock
# (BEGIN IMMEDIATE); PostgreSQL refuses the commit of a transaction that lost to another.
LOST_RACE = {
    "sqlite": ("BEGIN IMMEDIATE", "IO: database is locked", None),
    "postgresql": (
        "COMMIT",
        "IO: ERROR:  could not serialize access due to concurrent update",
        "40001",
    ),
}


def test_a_write_retries_while_the_database_is_still_locked(
    catalog_target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = open_catalog(catalog_target)
    statement, message, sqlstate = LOST_RACE[catalog.backend]
    real_execute = Database._execute
    refusals = {"left": 3}

    def locked_twice(conn: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        if sql == statement and refusals["left"]:
            refusals["left"] -= 1
            raise adbc_driver_manager.OperationalError(
                message, status_code=adbc_driver_manager.AdbcStatusCode.IO, sqlstate=sqlstate
            )
        return real_execute(conn, sql, params)

    monkeypatch.setattr(Database, "_execute", staticmethod(locked_twice))
    catalog.create_dataset("after-the-lock", "uid")
    assert refusals["left"] == 0
    assert [d.name for d in catalog.list_datasets()] == ["after-the-lock"]
    refusals["left"] = 100  # a lock that never goes away still fails, after a bounded wait
    with pytest.raises(adbc_driver_manager.OperationalError, match=message.split(":  ")[-1]):
        catalog.create_dataset("never", "uid")
    assert refusals["left"] > 0
    monkeypatch.undo()
    assert [d.name for d in catalog.list_datasets()] == ["after-the-lock"]
    catalog.close()
