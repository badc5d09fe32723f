"""What plugins cost: ``byte_tokenize`` rows/s, and a batch's trip to a worker process and back.

Run as ``python -m benchmarks.plugin_costs``. The trip is measured through a real
``TransformPool`` (2 spawned workers, a preprocessor that returns its batch), one batch at a
time and 8 in flight; pickle against Arrow IPC for a slice of a large table shows why
batches travel as IPC.
"""

from __future__ import annotations

import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from lavender_flight.flight_server.pool import TransformPool
from lavender_flight.transforms import Pipeline, Plugins
from lavender_flight.transforms.pipeline import pipeline_spec
from lavender_flight.transforms.worker import write_batch

NOOP = """
from lavender_flight.transforms import Preprocessor


class Noop(Preprocessor, name="noop"):
    def process(self, batch):
        return batch
"""


def texts(rows: int, seed: int = 0) -> pa.Array:
    """Random texts of 0-400 characters, some of them not ASCII."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghij klmnopqrstuvwxyzé€"))
    return pa.array(["".join(rng.choice(alphabet, k)) for k in rng.integers(0, 400, rows)])


def tokenizer() -> None:
    """Rows/s of byte_tokenize on batches of a few sizes."""
    plugins = Plugins.load(entry_points=False)
    for rows, length in ((256, 128), (4096, 128), (65536, 128), (4096, 512)):
        batch = pa.record_batch({"uid": np.arange(rows), "text": texts(rows)})
        pipeline = Pipeline.build(
            plugins, preprocessors=[("byte_tokenize", {"max_length": length})]
        )
        pipeline.process(batch)
        reps = max(5, 300_000 // rows)
        started = time.perf_counter()
        for _ in range(reps):
            pipeline.process(batch)
        seconds = (time.perf_counter() - started) / reps
        print(
            f"byte_tokenize {rows:6d} rows, max_length {length}: "
            f"{rows / seconds / 1e6:.2f} M rows/s"
        )


def trips() -> None:
    """A batch's round trip through the pool, per row."""
    big = pa.record_batch({"uid": np.arange(200_000), "text": texts(200_000, seed=1)})
    part = big.slice(1000, 256)
    print(
        f"a 256-row slice of a 200,000-row batch: pickle {len(pickle.dumps(part)) / 1e6:.1f} MB, "
        f"Arrow IPC {write_batch(part).size / 1e3:.1f} kB"
    )
    with tempfile.TemporaryDirectory(prefix="lf-bench-pool-") as tmp:
        (Path(tmp) / "noop.py").write_text(NOOP)
        pool = TransformPool(2, tmp)
        spec = json.dumps(pipeline_spec([], None, [("noop", {})], 0, False, "uid"))
        try:
            pool.outcome(pool.submit(spec, big.slice(0, 10)))  # started
            for rows in (16, 256, 4096, 65536):
                batch = big.slice(1000, rows)
                reps = max(16, 20_000 // rows)
                started = time.perf_counter()
                for _ in range(reps):
                    pool.outcome(pool.submit(spec, batch))
                one = (time.perf_counter() - started) / reps
                started = time.perf_counter()
                for _ in range(reps // 8):
                    futures = [pool.submit(spec, batch) for _ in range(8)]
                    for future in futures:
                        pool.outcome(future)
                many = (time.perf_counter() - started) / (reps // 8 * 8)
                print(
                    f"trip of {rows:5d} rows: {one * 1e6:6.0f} us "
                    f"({one / rows * 1e6:5.2f} us a row); "
                    f"8 in flight: {many / rows * 1e6:5.2f} us a row"
                )
        finally:
            pool.close()


if __name__ == "__main__":
    tokenizer()
    trips()
