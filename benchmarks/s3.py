"""S3 benchmark: the same iteration from a loopback S3 server (moto) and from local files.

The same Parquet shards are served twice by one Lavender Flight server: from a local folder
and from a bucket of moto's S3 API server on 127.0.0.1 (both in their own processes). The
ratio says what reading through S3 (HTTP, signing, whole-object GETs into memory) costs
next to reading local files, with the storage latency itself near zero: a real bucket adds
its network, which the block prefetch is there to hide.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import s3fs

from lavender_flight.client import api as lavender

from .common import Measure, lavender_server, measure, table, write_text_shards
from .iteration import _lavender

KEY, SECRET = "benchmark", "benchmark-secret"


@contextmanager
def moto_server(timeout: float = 30.0) -> Iterator[str]:
    """moto's S3 server on a port it picks; yields its endpoint URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    found: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # it logs every request: keep reading so it never blocks
        assert process.stderr is not None
        for line in process.stderr:
            match = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
            if match and not ready.is_set():
                found.append(match.group(1))
                ready.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        if not ready.wait(timeout):
            raise RuntimeError("moto's S3 server did not start")
        yield found[0]
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        reader.join(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def run(rows: int = 200_000, shards: int = 10, repeat: int = 3) -> dict[str, Any]:
    """Measure local vs S3, in order and shuffled; print the table; return the figures."""
    batch_size = 1024
    with tempfile.TemporaryDirectory(prefix="lf-bench-s3-") as tmp, moto_server() as endpoint:
        home = Path(tmp)
        data = home / "text"
        write_text_shards(data, rows, shards)
        s3 = s3fs.S3FileSystem(
            endpoint_url=endpoint, key=KEY, secret=SECRET, skip_instance_cache=True
        )
        s3.mkdir("bench")
        s3.put([str(p) for p in sorted(data.iterdir())], "bench/text/")
        options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}}
        results: list[Measure] = []
        lines = []
        with lavender_server(home / "server") as server:
            lavender.init(server.url)
            sources = {}
            for name, location, storage in (
                ("local", data.as_uri(), None),
                ("s3", "s3://bench/text", options),
            ):
                dataset = lavender.create_dataset(f"bench-{name}")
                lavender.create_shardset(dataset.id, location, storage_options=storage)
                sources[name] = dataset.id
                _lavender(dataset.id, batch_size, True, "arrow")  # warm up
            for shuffle in (False, True):
                order = "shuffled" if shuffle else "in order"
                local: Measure | None = None
                for name, dataset_id in sources.items():
                    m = measure(
                        f"{name} b{batch_size} {order}",
                        partial(_lavender, dataset_id, batch_size, shuffle, "arrow"),
                        repeat,
                    )
                    results.append(m)
                    local = local or m
                    lines.append(
                        [
                            m.name,
                            f"{m.samples_per_s / 1e6:.2f} M/s",
                            f"{m.mb_per_s:.0f}",
                            f"{m.first_batch_s * 1000:.0f} ms",
                            f"{m.samples_per_s / local.samples_per_s:.2f}",
                        ]
                    )
        print(
            f"\nS3 (moto on loopback) vs local files: {rows:,} rows of uid + 100-char text, "
            f"{shards} Parquet shards, median of {repeat}"
        )
        print(table(lines, ["case", "samples/s", "MB/s", "first batch", "vs local"]))
        return {"rows": rows, "shards": shards, "cases": [m.__dict__ for m in results]}
