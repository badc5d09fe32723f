"""A catalog written from many threads and from two ``Catalog`` objects on one file at once:
every write lands, and ``database is locked`` never reaches the caller."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import adbc_driver_manager
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.protocol.iterations import IterationRecord, RankProgressRecord

THREADS = 8
WRITES = 25
JOIN_TIMEOUT = 60.0


def test_concurrent_writes_from_threads_and_two_catalogs_all_land(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    first = Catalog(path)
    home = first.create_dataset("home", "uid")
    for number in range(THREADS):
        first.create_iteration(
            IterationRecord(
                id=f"it-{number}",
                dataset_id=home.id,
                spec={},
                plan={},
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
            catalog = first if number % 2 else Catalog(path)
            if catalog is not first:
                opened.append(catalog)
            for index in range(WRITES):
                dataset = catalog.create_dataset(f"d-{number}-{index}", "uid")
                catalog.save_progress(
                    [
                        RankProgressRecord(
                            iteration_id=f"it-{number}", rank=0, acked=[(0, index + 1)]
                        )
                    ]
                )
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
    check = Catalog(path)
    names = {d.name for d in check.list_datasets()} - {"home"}
    progress = [check.load_progress(f"it-{n}")[0].acked for n in range(THREADS)]
    check.close()
    assert progress == [[(0, WRITES)]] * THREADS
    expected = {f"d-{n}-{i}" for n in range(THREADS) for i in range(WRITES) if i % 5 != 0}
    assert names == expected
    for catalog in [first, *opened]:
        catalog.close()


def test_a_write_retries_while_the_database_is_still_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = Catalog(tmp_path / "catalog.db")
    real_run = Catalog._run
    refusals = {"left": 3}

    def locked_twice(conn: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        if sql == "BEGIN IMMEDIATE" and refusals["left"]:
            refusals["left"] -= 1
            raise adbc_driver_manager.OperationalError(
                "IO: database is locked", status_code=adbc_driver_manager.AdbcStatusCode.IO
            )
        return real_run(conn, sql, params)

    monkeypatch.setattr(Catalog, "_run", staticmethod(locked_twice))
    catalog.create_dataset("after-the-lock", "uid")
    assert refusals["left"] == 0
    assert [d.name for d in catalog.list_datasets()] == ["after-the-lock"]
    refusals["left"] = 100  # a lock that never goes away still fails, after a bounded wait
    with pytest.raises(adbc_driver_manager.OperationalError, match="database is locked"):
        catalog.create_dataset("never", "uid")
    monkeypatch.undo()
    assert [d.name for d in catalog.list_datasets()] == ["after-the-lock"]
    catalog.close()
