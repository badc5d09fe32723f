"""Preprocessing benchmark: a CPU-bound preprocessor on the server with 0, 1 and 2 workers.

The preprocessor does real Python work per sample (hashing its text a few hundred times),
the kind of work remote preprocessing takes off the GPU box. Servers run in their own
processes; the speed-up is against one worker in the same run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender

from .common import lavender_server, table, write_text_shards

PREPROCESSOR = '''
import hashlib
import pyarrow as pa
from lavender_flight.transforms import Preprocessor


class Digest(Preprocessor, name="digest"):
    """CPU-bound: a chain of SHA-256 rounds over each text."""

    def process(self, batch, *, rounds: int = 200):
        out = []
        for text in batch.column("text").to_pylist():
            value = text.encode()
            for _ in range(rounds):
                value = hashlib.sha256(value).digest()
            out.append(value.hex()[:16])
        return batch.append_column("digest", pa.array(out))
'''


def _run(url: str, dataset_name: str, batch_size: int) -> tuple[float, float]:
    lavender.init(url)
    dataset = lavender.get_dataset(name=dataset_name)
    start = time.perf_counter()
    first = 0.0
    rows = 0
    for batch in Iteration.from_dataset(
        dataset.id, batch_size=batch_size, preprocessors=["digest"], format="arrow"
    ):
        if not rows:
            first = time.perf_counter() - start
        rows += batch.num_rows
    return rows / (time.perf_counter() - start), first


def run(rows: int = 20_000, batch_size: int = 256) -> dict[str, Any]:
    """Measure 0 (inline), 1 and 2 workers; print the table; return the figures."""
    results: dict[str, Any] = {"rows": rows, "batch_size": batch_size, "cases": []}
    lines = []
    with tempfile.TemporaryDirectory(prefix="lf-bench-pre-") as tmp:
        home = Path(tmp)
        write_text_shards(home / "text", rows, 4)
        (home / "modules").mkdir()
        (home / "modules" / "digest.py").write_text(PREPROCESSOR)
        baseline = None
        for workers in (1, 0, 2):
            with lavender_server(
                home / f"server-{workers}", "--modules-dir", str(home / "modules"),
                "--workers", str(workers),
            ) as server:  # fmt: skip
                lavender.init(server.url)
                dataset = lavender.create_dataset("pre")
                lavender.create_shardset(dataset.id, (home / "text").as_uri())
                _run(server.url, "pre", batch_size)  # warm-up: starts the workers
                rate, first = _run(server.url, "pre", batch_size)
            if workers == 1:
                baseline = rate
            assert baseline is not None
            results["cases"].append(
                {"workers": workers, "samples_per_s": rate, "first_batch_s": first}
            )
            label = f"{workers} worker{'s' if workers != 1 else ''}"
            lines.append([
                label + (" (inline)" if not workers else ""),
                f"{rate:,.0f}", f"{first * 1000:.0f} ms", f"{rate / baseline:.2f}",
            ])  # fmt: skip
    print(f"\nPreprocessing: {rows:,} rows, CPU-bound preprocessor, batch {batch_size}")
    print(table(lines, ["server", "samples/s", "first batch", "vs 1 worker"]))
    return results
