"""Several nodes: one iteration over 1, 2 and 3 ``lavender-flight serve`` nodes on PostgreSQL vs
one node on SQLite, and what a claim and an ack cost on each backend.

``python -m benchmarks run --suites nodes`` (or ``python -m benchmarks.nodes [--quick]``).

Throughput: a dataset of text rows, one shuffled iteration of ``RANKS`` ranks, one client
process per rank given every node's URL (so rank r streams from node r % n), Arrow batches;
samples/s is the whole epoch over the wall time from the first loop's start to the last
loop's end. Every case checks that every sample was delivered once.

Costs: a ``ProgressStore`` on each backend, in this process: ``claim`` (one transaction:
the rank's row read ``FOR UPDATE`` / under ``BEGIN IMMEDIATE``, its JSON state changed and
written) of ``CLAIM_CHUNKS`` batches, and ``ack`` (the same shape) taking and completing
them. These are the statements a node pays per claim and per report; the README's capacity
model is built from them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .common import Server, _start, table, write_text_shards

RANKS = 6
BATCH = 256
CLAIM_CHUNKS = 8
"""Batches per measured claim (a stream claims about its read-ahead window at once)."""


# -- throughput --------------------------------------------------------------------------


@contextmanager
def node(home: Path, catalog: str) -> Iterator[Server]:
    """One ``lavender-flight serve`` on ``catalog``, on a free port."""
    server = _start(
        [sys.executable, "-m", "lavender_flight.flight_server", "serve", "--no-ui", "--port", "0",
         "--data-home", str(home), "--storage-root", str(home.parent), "--catalog", catalog,
         "--log-level", "WARNING"],
        r"serving (grpc://\S+)",
        "stderr",
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


def rank_loop(urls: list[str], dataset_id: str, iteration_id: str, rank: int) -> dict[str, Any]:
    """One client process: its rank of the iteration, every batch as Arrow."""
    from lavender_flight.client import Iteration
    from lavender_flight.client import api as lavender

    lavender.init(api_url=urls, timeout=60)
    iteration = Iteration.from_dataset(
        dataset_id, batch_size=BATCH, shuffle=True, shuffle_seed=1, world_size=RANKS,
        rank=rank, iteration_id=iteration_id, format="arrow",
    )  # fmt: skip
    iteration.id  # noqa: B018  (created or joined before the clock starts)
    started = time.time()
    uids: list[int] = []
    for batch in iteration:
        uids.extend(batch.column("uid").to_pylist())
    return {"started": started, "ended": time.time(), "uids": uids}


def epoch(urls: list[str], dataset_id: str, iteration_id: str, rows: int) -> float:
    """Samples/s of one epoch over every rank (each rank a process of its own)."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(RANKS, mp_context=spawn) as pool:
        loops = [
            pool.submit(rank_loop, urls, dataset_id, iteration_id, rank) for rank in range(RANKS)
        ]
        results = [loop.result(timeout=600) for loop in loops]
    every = sorted(u for r in results for u in r["uids"])
    if every != list(range(rows)):
        raise RuntimeError(f"{iteration_id}: {rows - len(set(every))} samples lost or repeated")
    wall = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return rows / wall


def register(url: str, data: Path, rows: int) -> str:
    """The text shards as a dataset of the catalog behind ``url``."""
    from lavender_flight.client import api as lavender

    lavender.init(url, timeout=60)
    dataset = lavender.create_dataset("nodes-bench")
    lavender.create_shardset(dataset.id, data.as_uri())
    found = lavender.get_dataset(dataset.id).total_samples
    if found != rows:
        raise RuntimeError(f"the dataset has {found} samples, not {rows}")
    return dataset.id


@contextmanager
def postgres() -> Iterator[Callable[[], str]]:
    """A throwaway PostgreSQL (Debian's binaries); yields a maker of fresh database URLs."""
    from tests.postgres import PostgresServer

    server = PostgresServer.start()
    try:
        yield lambda: server.url(server.create_database())
    finally:
        server.destroy()


def throughput(rows: int, repeat: int, database: Callable[[], str], home: Path) -> list[dict]:
    """Each case's samples/s (median of ``repeat`` epochs, one iteration each)."""
    data = home / "text"
    write_text_shards(data, rows, shards=12)
    cases: list[tuple[str, int, Callable[[], str]]] = [
        ("sqlite", 1, lambda: str(home / "sqlite" / "catalog.db")),
        ("postgresql", 1, database),
        ("postgresql", 2, database),
        ("postgresql", 3, database),
    ]
    found = []
    for backend, count, catalog_of in cases:
        catalog = catalog_of()
        (home / "sqlite").mkdir(exist_ok=True)
        with ExitStack() as stack:
            servers = [stack.enter_context(node(home, catalog)) for _ in range(count)]
            urls = [s.url for s in servers]
            dataset_id = register(urls[0], data, rows)
            rates = [
                epoch(urls, dataset_id, f"nodes-{backend}-{count}-{turn}", rows)
                for turn in range(repeat)
            ]
        rate = statistics.median(rates)
        found.append({"backend": backend, "nodes": count, "samples_per_s": round(rate)})
        print(f"  {backend} x{count}: {rate:,.0f} samples/s", flush=True)
    return found


# -- statement costs ---------------------------------------------------------------------


def costs(target: str, count: int) -> dict[str, float]:
    """Median microseconds of a claim and of an ack on the catalog at ``target``."""
    from lavender_flight.catalog import open_catalog
    from lavender_flight.flight_server.engine import ProgressStore, World
    from lavender_flight.protocol.iterations import IterationPlan, IterationRecord, IterationSpec

    size = (count + 10) * CLAIM_CHUNKS * BATCH
    catalog = open_catalog(target)
    try:
        dataset = catalog.create_dataset("costs", "uid")
        catalog.create_iteration(
            IterationRecord(
                id="it-costs",
                dataset_id=dataset.id,
                spec=IterationSpec(dataset_id=dataset.id, batch_size=BATCH),
                plan=IterationPlan(shards=[(0, size)], seed=0),
                total=size,
                created_at=0.0,
            )
        )
        store = ProgressStore(catalog, "nd-bench")
        handle = store.open_stream("it-costs", 0, 0, (0, 1), lambda rank: size, BATCH)
        claims, acks = [], []
        for turn in range(count + 10):
            started = time.perf_counter()
            claim = store.claim(handle, World(), CLAIM_CHUNKS)
            claimed = time.perf_counter()
            assert claim is not None and len(claim.units) == CLAIM_CHUNKS
            ranges = [r for unit in claim.units for r in unit]
            store.ack("it-costs", 0, 0, ranges, ranges)
            acked = time.perf_counter()
            if turn >= 10:  # warm: connections, statement caches
                claims.append((claimed - started) * 1e6)
                acks.append((acked - claimed) * 1e6)
        return {"claim_us": statistics.median(claims), "ack_us": statistics.median(acks)}
    finally:
        catalog.close()


# -- the suite ---------------------------------------------------------------------------


def run(rows: int = 200_000, repeat: int = 1, cost_calls: int = 300) -> dict[str, Any]:
    """Measure both; print the tables; return the figures."""
    print("\nNodes (one iteration of 6 ranks; claims and acks):", flush=True)
    with tempfile.TemporaryDirectory(prefix="lf-bench-nodes-") as tmp, postgres() as database:
        home = Path(tmp) / "home"
        home.mkdir()
        cases = throughput(rows, repeat, database, home)
        backends = {
            "sqlite": costs(str(Path(tmp) / "costs.db"), cost_calls),
            "postgresql": costs(database(), cost_calls),
        }
    base = next(c["samples_per_s"] for c in cases if c["backend"] == "sqlite")
    rates = [
        [
            c["backend"],
            str(c["nodes"]),
            f"{c['samples_per_s']:,}",
            f"{c['samples_per_s'] / base:.2f}x",
        ]
        for c in cases
    ]
    print("\n" + table(rates, ["catalog", "nodes", "samples/s", "vs 1 on SQLite"]))
    per_row = CLAIM_CHUNKS * BATCH * 1e6
    spent = [
        [
            name,
            f"{c['claim_us']:,.0f}",
            f"{c['ack_us']:,.0f}",
            f"{per_row / (c['claim_us'] + c['ack_us']):,.0f}",
        ]
        for name, c in backends.items()
    ]
    header = ["catalog", "claim us", "ack us", f"samples/s per rank row ({CLAIM_CHUNKS}x{BATCH})"]
    print("\n" + table(spent, header))
    return {
        "rows": rows,
        "ranks": RANKS,
        "batch_size": BATCH,
        "cases": cases,
        "costs": backends,
        "claim_chunks": CLAIM_CHUNKS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the data")
    parser.add_argument("--repeat", type=int, default=1, help="epochs per case (median)")
    args = parser.parse_args()
    run(rows=20_000 if args.quick else 200_000, repeat=args.repeat)


if __name__ == "__main__":
    main()
