"""A torch ``DataLoader`` whose collate does real CPU work: 0 workers against 2.

``text`` rows (half as many as the side by side's: 500k, 50k with ``--quick``) through
``Iteration.to_torch_dataloader`` (batch 1024, ``format="torch"``), its collate replaced by
:class:`benchmarks.work.TokenizeAndHash`: every row byte-tokenized into ``input_ids`` and
hashed (about 9 us a row, measured and printed with the table). The work is the same in
both cases; with 0 workers it runs in the loop's process, with 2 in the spawned workers, so
the ratio says whether the workers pay for themselves once the collate has work to do. Each
case runs in a fresh client process (``benchmarks.case``) after a warm-up epoch. Samples/s
counts a whole epoch, from creating the iteration to the end of the loop (the workers'
start-up and shutdown included, as for the side-by-side loader cases); the table also shows
the phases apart: time to the first batch, samples/s from the first batch to the last, and
the time from the last batch to the end of the loop.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from lavender_flight.client import api as lavender

from .common import lavender_server, table, text_rows
from .data import TEXT_SHARDS, DataSet, write
from .side_by_side import BATCH, Runner
from .work import TokenizeAndHash, cost_per_row_us

WORK = {"rounds": 32}
CASES = {
    workers: f"lavender torch loader b1024 {workers} workers, CPU collate" for workers in (0, 2)
}
NEXT_EPOCH = "lavender torch loader b1024 2 workers, CPU collate, 2nd epoch"
"""The second epoch of one loader with 2 workers (they started with the first and stayed)."""


def run(rows: int, repeat: int) -> dict[str, Any]:
    """Both cases; prints the table; returns the records."""
    runner = Runner(repeat=repeat, warmup=1)
    cost = cost_per_row_us(**WORK)
    with tempfile.TemporaryDirectory(prefix="lf-bench-loader-") as tmp:
        home = Path(tmp)
        folder, row_bytes = write(home / "text", text_rows, rows, TEXT_SHARDS)
        data = DataSet("text", folder, rows, row_bytes, "uid + 100-char text")
        with lavender_server(home / "server") as server:
            lavender.init(server.url)
            dataset = lavender.create_dataset("bench-loader")
            lavender.create_shardset(dataset.id, folder.as_uri())
            for workers, name in CASES.items():
                spec = {
                    "kind": "lavender", "url": server.url, "dataset_id": dataset.id,
                    "batch_size": BATCH, "format": "torch", "loader_workers": workers,
                    "collate_work": WORK,
                }  # fmt: skip
                runner.case(data, "lavender", name, spec, server.process.pid)
            runner.case(data, "lavender", NEXT_EPOCH, {**spec, "loader_epochs": 2},
                        server.process.pid)  # fmt: skip
    base = next((r for r in runner.records if r["case"] == CASES[0] and "samples_per_s" in r), None)
    lines = []
    for record in runner.records:
        if "not_measured" in record:
            lines.append([record["case"], "not measured: " + record["not_measured"]] + [""] * 4)
            continue
        record.update(phases(record))
        if base is not None:
            record["vs_0_workers"] = record["samples_per_s"] / base["samples_per_s"]
        lines.append([
            record["case"], f"{record['samples_per_s']:,.0f}",
            f"{record['first_batch_s'] * 1000:.0f} ms",
            f"{record['steady_samples_per_s']:,.0f}", f"{record['tail_s'] * 1000:.0f} ms",
            f"{record['vs_0_workers']:.2f}" if "vs_0_workers" in record else "-",
        ])  # fmt: skip
    print(
        f"\nLoader: {rows:,} rows of uid + 100-char text through to_torch_dataloader, the "
        f"collate byte-tokenizing and hashing every row ({TokenizeAndHash.__name__}, "
        f"{cost:.1f} us a row here), median of {repeat}"
    )
    header = [
        "case", "samples/s", "first batch", "first to last batch", "after last batch",
        "vs 0 workers",
    ]  # fmt: skip
    print(table(lines, header))
    return {"rows": rows, "repeat": repeat, "collate_us_per_row": cost, "cases": runner.records}


def phases(record: dict[str, Any]) -> dict[str, float]:
    """Medians of the epoch's phases: start-up (to the first batch), the rate from the first
    batch to the last, and the tail (from the last batch until the loop ends: the workers'
    shutdown)."""
    runs = zip(record["runs_first_s"], record["runs_last_s"], record["runs_seconds"], strict=True)
    steady, tails = [], []
    for first, last, seconds in runs:
        steady.append(record["rows"] / (last - first) if last > first else 0.0)
        tails.append(seconds - last)
    return {"steady_samples_per_s": statistics.median(steady), "tail_s": statistics.median(tails)}
