"""Time to the first batch: a new iteration, from ``Iteration.from_dataset`` to its first batch.

The ``text`` rows (uid + 100-character text, 10 Parquet shards) on one server; each case
runs in a fresh client process (``benchmarks.case``, kind ``first_batch``) after one warm-up
iteration (imports, connections, the server's first read of the shards), then makes a new
iteration per repetition, takes its first batch and drops the rest. Shuffled, the first
batch waits for a block of 4 shards (the default ``shuffle_block_size``) to be read and
mixed; in order, for one shard. Figures are medians; min and max show the spread.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lavender_flight.client import api as lavender

from .common import lavender_server, table, text_rows
from .data import TEXT_SHARDS, DataSet, write
from .side_by_side import BATCH, Runner

SHUFFLED = "lavender arrow b1024 shuffled, first batch"
IN_ORDER = "lavender arrow b1024 in order, first batch"


def run(rows: int, repeat: int) -> dict[str, Any]:
    """Both cases; prints the table; returns the records (``first_batch_s`` is the median)."""
    runner = Runner(repeat=repeat, warmup=1)
    with tempfile.TemporaryDirectory(prefix="lf-bench-first-") as tmp:
        home = Path(tmp)
        folder, row_bytes = write(home / "text", text_rows, rows, TEXT_SHARDS)
        data = DataSet("text", folder, rows, row_bytes, "uid + 100-char text")
        with lavender_server(home / "server") as server:
            lavender.init(server.url)
            dataset = lavender.create_dataset("bench-first")
            lavender.create_shardset(dataset.id, folder.as_uri())
            base = {"kind": "first_batch", "url": server.url, "dataset_id": dataset.id,
                    "batch_size": BATCH}  # fmt: skip
            for name, shuffle in ((SHUFFLED, True), (IN_ORDER, False)):
                spec = {**base, "shuffle": shuffle}
                runner.case(data, "lavender", name, spec, server.process.pid, first_only=True)
    lines = []
    for record in runner.records:
        if "not_measured" in record:
            lines.append([record["case"], "not measured: " + record["not_measured"], "", ""])
            continue
        firsts = record["runs_first_s"]
        lines.append([
            record["case"], f"{record['first_batch_s'] * 1000:.0f} ms",
            f"{min(firsts) * 1000:.0f} ms", f"{max(firsts) * 1000:.0f} ms",
        ])  # fmt: skip
    print(
        f"\nFirst batch: a new iteration over {rows:,} rows of uid + 100-char text "
        f"({TEXT_SHARDS} shards), median of {repeat}"
    )
    print(table(lines, ["case", "first batch", "min", "max"]))
    return {"rows": rows, "repeat": repeat, "cases": runner.records}
