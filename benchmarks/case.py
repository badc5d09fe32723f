"""One measured case in a fresh client process: ``python -m benchmarks.case '<json spec>'``.

Runs the case ``warmup`` + ``repeat`` times and prints one JSON line: per repetition the
rows, bytes, seconds and time to first batch; and the process's peak RSS (``ru_maxrss``,
workers of a torch ``DataLoader`` reported apart). A fresh process per case keeps one
case's memory out of the next one's peak.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterable
from typing import Any


def _count(batch: Any) -> int:
    if hasattr(batch, "num_rows"):
        return int(batch.num_rows)
    first = next(iter(batch.values()))
    return len(first)


def _loop(batches: Iterable[Any], start: float, row_bytes: float) -> dict[str, float]:
    rows = 0
    size = 0.0
    first = 0.0
    for batch in batches:
        if not rows:
            first = time.perf_counter() - start
        count = _count(batch)
        rows += count
        size += batch.nbytes if hasattr(batch, "nbytes") else count * row_bytes
    return {"rows": rows, "bytes": size, "seconds": time.perf_counter() - start, "first": first}


def bare(spec: dict[str, Any]) -> dict[str, float]:
    import pyarrow.flight as flight

    client = flight.connect(spec["url"])
    start = time.perf_counter()
    reader = client.do_get(flight.Ticket(str(spec["batch_size"]).encode()))
    result = _loop((chunk.data for chunk in reader), start, spec["row_bytes"])
    client.close()
    return result


def parquet(spec: dict[str, Any]) -> dict[str, float]:
    import pyarrow.dataset as ds

    start = time.perf_counter()
    dataset = ds.dataset(spec["folder"], format="parquet")
    batches = dataset.to_batches(batch_size=spec["batch_size"], use_threads=False)
    return _loop(batches, start, spec["row_bytes"])


def lavender(spec: dict[str, Any]) -> dict[str, float]:
    from lavender_flight.client import Iteration, api

    api.init(spec["url"])
    start = time.perf_counter()
    iteration = Iteration.from_dataset(
        spec["dataset_id"],
        shardsets=spec.get("shardsets"),
        batch_size=spec["batch_size"],
        shuffle=spec.get("shuffle", False),
        shuffle_seed=1,
        filters=spec.get("filters"),
        preprocessors=spec.get("preprocessors"),
        format=spec.get("format", "arrow"),
    )
    workers = spec.get("loader_workers")
    if workers is None:
        return _loop(iteration, start, spec["row_bytes"])
    return _loop(iteration.to_torch_dataloader(num_workers=workers), start, spec["row_bytes"])


KINDS = {"bare": bare, "parquet": parquet, "lavender": lavender}


def main() -> None:
    spec = json.loads(sys.argv[1])
    run = KINDS[spec["kind"]]
    for _ in range(spec.get("warmup", 0)):
        run(spec)
    runs = [run(spec) for _ in range(spec.get("repeat", 1))]
    print(
        json.dumps(
            {
                "runs": runs,
                "client_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "workers_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
