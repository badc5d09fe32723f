"""Iteration benchmark: Lavender Flight iterations beside a bare Flight server, same rows.

Both servers run in their own processes; the client loop runs here. Samples/s counts rows
delivered to the consumer (``format="arrow"``: the transport itself; ``python``: dict of
lists, what a plain loop sees); time to first batch runs from creating the iteration
(or calling ``do_get``) to holding the first batch.

Then the joined cases: two more datasets over the same text shards, each with a feature
shardset (``uid``, ``score`` float32, ``label`` int64) of the same uids: one *aligned* (the
text shards' boundaries and uid order: its columns are attached without copying), one
*unaligned* (7 shards, rows shuffled by a fixed seed: joined through the uid index). Each is
compared with the single-shardset case of the same order in the same run.
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

from .common import (
    Measure,
    bare_server,
    lavender_server,
    measure,
    table,
    write_feature_shards,
    write_text_shards,
)

JOINED_BATCH = 1024
# feature shardset: shard count and row shuffle seed (None: aligned with the text shards)
UNALIGNED_SHARDS = 7
UNALIGNED_SEED = 1


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


def _name(batch_size: int, shuffle: bool, fmt: str, joined: str = "") -> str:
    order = "shuffled" if shuffle else "in order"
    return f"lavender b{batch_size} {order} {fmt}" + (f" joined {joined}" if joined else "")


def run(rows: int = 1_000_000, shards: int = 10, repeat: int = 3) -> dict[str, Any]:
    """Measure every case; print the tables; return the figures."""
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        home = Path(tmp)
        data = home / "text"
        write_text_shards(data, rows, shards)
        features = {
            "aligned": (home / "extra-aligned", shards, None),
            "unaligned": (home / "extra-unaligned", UNALIGNED_SHARDS, UNALIGNED_SEED),
        }
        for folder, count, seed in features.values():
            write_feature_shards(folder, rows, count, shuffle_seed=seed)
        results: list[Measure] = []
        lines = []
        single: dict[str, Measure] = {}
        joined: list[dict[str, Any]] = []
        joined_lines = []
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
                        name = _name(batch_size, shuffle, fmt)
                        m = measure(
                            name,
                            partial(_lavender, dataset.id, batch_size, shuffle, fmt),
                            repeat,
                        )
                        results.append(m)
                        single[name] = m
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
            for kind, (folder, _, _) in features.items():
                # the same text shards as main + the feature shardset
                joined_set = lavender.create_dataset(f"bench-text-joined-{kind}")
                lavender.create_shardset(joined_set.id, data.as_uri(), is_main=True)
                lavender.create_shardset(joined_set.id, folder.as_uri())
                for shuffle in (False, True):
                    name = _name(JOINED_BATCH, shuffle, "arrow", kind)
                    m = measure(
                        name,
                        partial(_lavender, joined_set.id, JOINED_BATCH, shuffle, "arrow"),
                        repeat,
                    )
                    ref = single[_name(JOINED_BATCH, shuffle, "arrow")]
                    ratio = m.samples_per_s / ref.samples_per_s
                    joined.append(
                        {**m.__dict__, "single_samples_per_s": ref.samples_per_s, "ratio": ratio}
                    )
                    joined_lines.append(
                        [
                            name,
                            f"{m.samples_per_s / 1e6:.2f} M/s",
                            f"{m.mb_per_s:.0f}",
                            f"{m.first_batch_s * 1000:.0f} ms",
                            f"{ref.samples_per_s / 1e6:.2f} M/s",
                            f"{ratio:.2f}",
                        ]
                    )
        print(
            f"\nIteration: {rows:,} rows of uid + 100-char text, {shards} Parquet shards, "
            f"median of {repeat}"
        )
        print(table(lines, ["case", "samples/s", "MB/s", "first batch", "bare flight", "ratio"]))
        print(
            f"\nJoined: + a feature shardset (uid, score, label), aligned ({shards} shards, "
            f"same order) or unaligned ({UNALIGNED_SHARDS} shards, shuffled), median of {repeat}"
        )
        header = ["case", "samples/s", "MB/s", "first batch", "single shardset", "joined/single"]
        print(table(joined_lines, header))
        return {
            "rows": rows,
            "cases": [m.__dict__ for m in results],
            "joined": joined,
        }
