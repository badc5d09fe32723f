"""What one catalog call costs on each backend: a small write transaction and a read.

``python -m benchmarks.catalog_costs [-n 1000] [--postgresql URL] [--pg-setting k=v ...]``

The write reads one row of ``iteration_ranks`` and updates it, then commits (the shape of an
ack or a claim), under ``lock="catalog"`` (every catalog write today) and ``lock="rows"``
(``SELECT ... FOR UPDATE``, what claims will use). The reads are one primary-key ``SELECT``
and ``load_progress`` (the same row through the public API). SQLite is a fresh file in a
temporary folder (WAL, synchronous=NORMAL); PostgreSQL is ``--postgresql`` or else a
throwaway cluster of Debian's binaries on loopback (default settings: synchronous_commit=on,
so each commit waits for its WAL flush). Times are per call, one thread, in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lavender_flight.catalog import Catalog, Lock, Transaction, open_catalog
from lavender_flight.protocol.iterations import (
    IterationPlan,
    IterationRecord,
    IterationSpec,
)

WHERE_ROW = "WHERE iteration_id = ? AND epoch = 0 AND rank = ?"
READ_ROW = f"SELECT state, updated_at FROM iteration_rank_states {WHERE_ROW}"
UPDATE_ROW = f"UPDATE iteration_rank_states SET updated_at = ? {WHERE_ROW}"
INSERT_ROW = (
    "INSERT INTO iteration_rank_states (iteration_id, epoch, rank, state, expires_at, nodes,"
    " updated_at) VALUES (?, 0, 0, ?, NULL, '[]', 0.0)"
)


def prepare(catalog: Catalog) -> None:
    dataset = catalog.create_dataset("bench", "uid")
    catalog.create_iteration(
        IterationRecord(
            id="it-bench",
            dataset_id=dataset.id,
            spec=IterationSpec(dataset_id=dataset.id, batch_size=10),
            plan=IterationPlan(shards=[(0, 1000)], seed=0),
            total=1000,
            created_at=0.0,
        )
    )
    # a rank's state row as the engine keeps it (a JSON document of a few hundred bytes)
    state = '{"size": 1000, "batch_size": 10, "completed": [[0, 10]], "taken": [[10, 20]]}'
    catalog._db.transaction(lambda tx: tx.run(INSERT_ROW, ("it-bench", state)))


def write(catalog: Catalog, lock: Lock) -> Callable[[], None]:
    def body(tx: Transaction) -> None:
        sql = tx.dialect.for_update(READ_ROW) if lock == "rows" else READ_ROW
        (_, updated_at), *_ = tx.run(sql, ("it-bench", 0))
        tx.run(UPDATE_ROW, (float(updated_at) + 1.0, "it-bench", 0))

    return lambda: catalog._db.transaction(body, lock=lock)


def timings(call: Callable[[], object], count: int) -> dict[str, float]:
    for _ in range(min(50, count)):  # warm: connections, statement caches
        call()
    spent = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        spent.append((time.perf_counter() - started) * 1e6)
    spent.sort()
    return {
        "median": statistics.median(spent),
        "p90": spent[int(len(spent) * 0.9)],
        "calls/s": 1e6 * len(spent) / sum(spent),
    }


@contextmanager
def postgres(url: str | None, settings: dict[str, str]) -> Iterator[str]:
    if url:
        yield url
        return
    from tests.postgres import PostgresServer

    server = PostgresServer.start(settings)
    try:
        yield server.url(server.create_database())
    finally:
        server.destroy()


def measure(name: str, target: str, count: int) -> list[tuple[str, str, dict[str, float]]]:
    catalog = open_catalog(target)
    try:
        prepare(catalog)
        cases: list[tuple[str, Callable[[], object]]] = [
            ("write: SELECT FOR UPDATE + update + commit (lock=rows)", write(catalog, "rows")),
            ("write: read 1 row + update it + commit (lock=catalog)", write(catalog, "catalog")),
            ("read: one row by primary key", lambda: catalog._query(READ_ROW, ("it-bench", 0))),
            ("read: load_rank_states (API)", lambda: catalog.load_rank_states("it-bench", 0)),
        ]
        return [(name, case, timings(call, count)) for case, call in cases]
    finally:
        catalog.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="calls per case (default 1000)")
    parser.add_argument("--postgresql", help="an existing empty database (default: a temp one)")
    parser.add_argument(
        "--pg-setting", action="append", default=[], help="k=v for the temp PostgreSQL"
    )
    args = parser.parse_args()
    settings = dict(s.split("=", 1) for s in args.pg_setting)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        rows += measure("sqlite", str(Path(folder) / "catalog.db"), args.n)
    with postgres(args.postgresql, settings) as url:
        label = "postgresql" + "".join(f" {k}={v}" for k, v in settings.items())
        rows += measure(label, url, args.n)
    print(f"{'backend':<34} {'case':<56} {'median us':>10} {'p90 us':>9} {'calls/s':>9}")
    for backend, case, numbers in rows:
        print(
            f"{backend:<34} {case:<56} {numbers['median']:>10.0f} {numbers['p90']:>9.0f} "
            f"{numbers['calls/s']:>9.0f}"
        )


if __name__ == "__main__":
    main()
