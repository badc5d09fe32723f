"""Iteration benchmark: Lavender Flight iterations beside a bare Flight server, same rows.

Both servers run in their own processes; the client loop runs here. Samples/s counts rows
delivered to the consumer (``format="arrow"``: the transport itself; ``python``: dict of
lists, what a plain loop sees); time to first batch runs from creating the iteration
(or calling ``do_get``) to holding the first batch.
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.flight as flight

from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender

from .common import Measure, bare_server, lavender_server, measure, table, write_text_shards


def _bare(url: str, batch_size: int) -> tuple[int, int, float]:
    client = flight.connect(url)
    start = time.perf_counter()
    reader = client.do_get(flight.Ticket(str(batch_size).encode()))
    rows = size = 0
    first = 0.0
    for chunk in reader:
        if not rows:
            first = time.perf_counter() - start
        rows += chunk.data.num_rows
        size += chunk.data.nbytes
    client.close()
    return rows, size, first


def _lavender(dataset_id: str, batch_size: int, shuffle: bool, fmt: str) -> tuple[int, int, float]:
    start = time.perf_counter()
    iteration = Iteration.from_dataset(
        dataset_id, batch_size=batch_size, shuffle=shuffle, shuffle_seed=1, format="arrow"
    )
    rows = size = 0
    first = 0.0
    for batch in iteration:
        if not rows:
            first = time.perf_counter() - start
        if fmt == "python":
            batch.to_pydict()
        rows += batch.num_rows
        size += batch.nbytes
    return rows, size, first


def run(rows: int = 1_000_000, shards: int = 10, repeat: int = 3) -> dict[str, Any]:
    """Measure every case; print the table; return the figures."""
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        home = Path(tmp)
        data = home / "text"
        write_text_shards(data, rows, shards)
        results: list[Measure] = []
        lines = []
        with bare_server(data) as bare, lavender_server(home / "server") as server:
            lavender.init(server.url)
            dataset = lavender.create_dataset("bench-text")
            lavender.create_shardset(dataset.id, data.as_uri())
            _lavender(dataset.id, 1024, True, "arrow")  # warm both processes up
            _bare(bare.url, 1024)
            for batch_size in (32, 1024):
                limit = measure(
                    f"bare flight b{batch_size}", partial(_bare, bare.url, batch_size), repeat
                )
                results.append(limit)
                for shuffle in (False, True):
                    for fmt in ("arrow", "python"):
                        name = (
                            f"lavender b{batch_size} {'shuffled' if shuffle else 'in order'} {fmt}"
                        )
                        m = measure(
                            name,
                            partial(_lavender, dataset.id, batch_size, shuffle, fmt),
                            repeat,
                        )
                        results.append(m)
                        lines.append(
                            [
                                name,
                                f"{m.samples_per_s / 1e6:.2f} M/s",
                                f"{m.mb_per_s:.0f}",
                                f"{m.first_batch_s * 1000:.0f} ms",
                                f"{limit.samples_per_s / 1e6:.2f} M/s",
                                f"{m.samples_per_s / limit.samples_per_s:.2f}",
                            ]
                        )
        print(
            f"\nIteration: {rows:,} rows of uid + 100-char text, {shards} Parquet shards, "
            f"median of {repeat}"
        )
        print(table(lines, ["case", "samples/s", "MB/s", "first batch", "bare flight", "ratio"]))
        return {
            "rows": rows,
            "cases": [m.__dict__ for m in results],
        }
