"""One measured case in a fresh client process: ``python -m benchmarks.case '<json spec>'``.

Runs the case ``warmup`` + ``repeat`` times and prints one JSON line: per repetition the
rows, bytes, seconds and time to first batch; and the process's peak RSS (``ru_maxrss``,
workers of a torch ``DataLoader`` reported apart). A fresh process per case keeps one
case's memory out of the next one's peak.

Kinds: ``bare`` (a bare Flight do_get), ``parquet`` (a local scan), ``lavender`` (a whole
epoch of a new iteration; with ``loader_workers``, through ``to_torch_dataloader``, with
``collate_work``, the loader's collate also runs :class:`benchmarks.work.TokenizeAndHash`
with those options, and with ``loader_epochs`` N, the Nth epoch of one loader is measured:
its workers started with the first and stayed), ``first_batch`` (a new iteration, up to
its first batch, then dropped).

Each run of a ``bare`` or ``lavender`` case also reports its CPU seconds (``cpu``, see
:mod:`benchmarks.cpu`): the client process, its loop thread, a loader's workers and the
server (the spec's ``server_pid``), from the run's start (a loader's measured epoch's) to
its end.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterable
from typing import Any

from .cpu import process_cpu_s


class Cpu:
    """CPU seconds spent from its creation to :meth:`done`, by the processes of a run."""

    def __init__(self, server_pid: int | None, workers: list[int] | None = None) -> None:
        self.server_pid = server_pid
        self.workers = {pid: process_cpu_s(pid) for pid in workers or []}
        self.client = time.process_time()
        self.loop_thread = time.thread_time()
        self.server = process_cpu_s(server_pid) if server_pid else None

    def done(self, workers: list[int] | None = None) -> dict[str, float | None]:
        """What each spent since; ``workers``: the loader's worker pids now (a worker that
        started meanwhile counts whole, one that ended is not counted: None)."""
        # the thread read first, as it was read last at the start: the process's window
        # holds the thread's, so the client never reads less than its loop thread
        loop_thread = time.thread_time() - self.loop_thread
        spent: dict[str, float | None] = {
            "client": time.process_time() - self.client,
            "loop_thread": loop_thread,
            "workers": None,
            "server": None,
        }
        if self.server_pid and self.server is not None:
            now = process_cpu_s(self.server_pid)
            spent["server"] = None if now is None else now - self.server
        if workers:
            total = 0.0
            for pid in workers:
                now, before = process_cpu_s(pid), self.workers.get(pid, 0.0)
                if now is None or before is None:
                    return spent
                total += now - before
            spent["workers"] = total
        return spent


def _worker_pids(loader: Any) -> list[int]:
    """The pids of a torch ``DataLoader``'s live workers (none before its first epoch)."""
    iterator = getattr(loader, "_iterator", None)
    return [p.pid for p in getattr(iterator, "_workers", ()) if p.pid is not None]


def _count(batch: Any) -> int:
    if hasattr(batch, "num_rows"):
        return int(batch.num_rows)
    first = next(iter(batch.values()))
    return len(first)


def _loop(batches: Iterable[Any], start: float, row_bytes: float) -> dict[str, float]:
    """Consume ``batches``; seconds from ``start`` to the first batch, the last, the end.

    Bytes are counted at the first batch's size per row (Arrow batches) or ``row_bytes``:
    asking every batch its ``nbytes`` costs ~4 us, as much as a small batch's delivery.
    """
    rows = 0
    first = last = 0.0
    for batch in batches:
        last = time.perf_counter() - start
        if not rows:
            first = last
            count = _count(batch)
            if hasattr(batch, "nbytes") and count:
                row_bytes = batch.nbytes / count
            rows = count
            continue
        rows += _count(batch)
    seconds = time.perf_counter() - start
    return {"rows": rows, "bytes": rows * row_bytes, "seconds": seconds, "first": first,
            "last": last}  # fmt: skip


def bare(spec: dict[str, Any]) -> dict[str, float]:
    import pyarrow.flight as flight

    client = flight.connect(spec["url"])
    cpu = Cpu(spec.get("server_pid"))
    start = time.perf_counter()
    reader = client.do_get(flight.Ticket(str(spec["batch_size"]).encode()))
    result = _loop((chunk.data for chunk in reader), start, spec["row_bytes"])
    client.close()
    return {**result, "cpu": cpu.done()}


def parquet(spec: dict[str, Any]) -> dict[str, float]:
    import pyarrow.dataset as ds

    start = time.perf_counter()
    dataset = ds.dataset(spec["folder"], format="parquet")
    batches = dataset.to_batches(batch_size=spec["batch_size"], use_threads=False)
    return _loop(batches, start, spec["row_bytes"])


def lavender(spec: dict[str, Any]) -> dict[str, float]:
    from lavender_flight.client import api

    api.init(spec["url"])
    cpu = Cpu(spec.get("server_pid"))
    start = time.perf_counter()
    iteration = _iteration(spec)
    workers = spec.get("loader_workers")
    if workers is None:
        return {**_loop(iteration, start, spec["row_bytes"]), "cpu": cpu.done()}
    loader = iteration.to_torch_dataloader(num_workers=workers)
    if spec.get("collate_work") is not None:
        from .work import TokenizeAndHash

        # the same work in the loop's process (0 workers) or in each worker
        loader.collate_fn = TokenizeAndHash(**spec["collate_work"])
    before = int(spec.get("loader_epochs", 1)) - 1
    if before > 0:
        # the workers start with the first epoch and stay (persistent): the measured epoch
        # is the next, as every epoch of a job but its first; the first is reported apart
        for _ in range(before):
            _loop(loader, start, spec["row_bytes"])
        started = time.perf_counter() - start
        cpu = Cpu(spec.get("server_pid"), _worker_pids(loader))
        result = _loop(loader, time.perf_counter(), spec["row_bytes"])
        return {**result, "startup": started, "cpu": cpu.done(_worker_pids(loader))}
    result = _loop(loader, start, spec["row_bytes"])
    return {**result, "cpu": cpu.done(_worker_pids(loader))}


def first_batch(spec: dict[str, Any]) -> dict[str, float]:
    """From creating the iteration to holding its first batch; the rest is not read."""
    from lavender_flight.client import api

    api.init(spec["url"])
    start = time.perf_counter()
    batches = iter(_iteration(spec))
    batch = next(batches)
    first = time.perf_counter() - start
    batches.close()
    rows = _count(batch)
    size = batch.nbytes if hasattr(batch, "nbytes") else rows * spec["row_bytes"]
    return {"rows": rows, "bytes": size, "seconds": first, "first": first, "last": first}


def _iteration(spec: dict[str, Any]) -> Any:
    from lavender_flight.client import Iteration

    return Iteration.from_dataset(
        spec["dataset_id"],
        shardsets=spec.get("shardsets"),
        batch_size=spec["batch_size"],
        shuffle=spec.get("shuffle", False),
        shuffle_seed=1,
        filters=spec.get("filters"),
        preprocessors=spec.get("preprocessors"),
        format=spec.get("format", "arrow"),
    )


KINDS = {"bare": bare, "parquet": parquet, "lavender": lavender, "first_batch": first_batch}


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
