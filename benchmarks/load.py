"""A load test: 8 training clients, catalog churn and a dashboard-like poller on one server.

``python -m benchmarks.load --seconds 120``: a real ``lavender-flight serve`` process; six
clients that each make a new shuffled iteration per epoch and two ranks that share one
iteration over many epochs (spawned processes, every epoch checked: every sample once); a
thread that creates, fills and deletes datasets all along; a poller asking for every
iteration's progress as the dashboard does. It prints the errors seen (by kind), the epochs
run, and the server's RSS at the start, the end and its peak (from ``/proc``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROWS = 4 * 2000
SERVING = re.compile(r"^Lavender Flight serving (grpc://[\w.\-]+:\d+)\s*$")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_dataset(name: str, folder: Path, shards: int, rows: int) -> str:
    from lavender_flight.client import Writer
    from lavender_flight.client import api as lavender

    dataset = lavender.create_dataset(name=name)
    shardset = lavender.create_shardset(
        dataset.id,
        folder.as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="text", type_="str"),
        ],
    )
    writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset.id)
    for index in range(shards):
        first = index * rows
        writer.write(
            [{"uid": u, "text": f"sample {u} " * 5} for u in range(first, first + rows)],
            shard_index=index,
            overwrite=True,
        )
    return dataset.id


def client(url: str, dataset_id: str, rank: int | None, until: float) -> dict[str, Any]:
    """One training process: epochs until ``until``, each checked."""
    from lavender_flight.client import Iteration
    from lavender_flight.client import api as lavender

    lavender.init(url, timeout=30)
    epochs, bad, errors = 0, 0, Counter[str]()
    shared = None
    if rank is not None:
        shared = Iteration.from_dataset(
            dataset_id, batch_size=16, shuffle=True, shuffle_seed=7, rank=rank,
            world_size=2, iteration_id="load-shared",
        )  # fmt: skip
    while time.time() < until:
        try:
            iteration = shared or Iteration.from_dataset(dataset_id, batch_size=16, shuffle=True)
            uids = [u for batch in iteration for u in batch["uid"]]
            epochs += 1
            expected = ROWS if rank is None else None
            if (expected is not None and sorted(uids) != list(range(ROWS))) or len(uids) != len(
                set(uids)
            ):
                bad += 1
        except Exception as exc:
            errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
    return {"rank": rank, "epochs": epochs, "bad": bad, "errors": dict(errors)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args(argv)
    from lavender_flight.client import api as lavender

    tmp = Path(tempfile.mkdtemp(prefix="lavender-load-"))
    command = Path(sys.executable).with_name("lavender-flight")
    server = subprocess.Popen(
        [str(command), "serve", "--no-ui", "--port", "0", "--data-home", str(tmp / "home"),
         "--storage-root", str(tmp)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stderr is not None
    url = ""
    for line in server.stderr:
        found = SERVING.match(line)
        if found:
            url = found.group(1)
            break
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    lavender.init(url, timeout=30)
    dataset_id = write_dataset("load", tmp / "data", shards=4, rows=ROWS // 4)
    start_rss = rss_mb(server.pid)
    stop = threading.Event()
    errors: Counter[str] = Counter()
    counts = Counter[str]()
    samples: list[float] = []

    def churn() -> None:
        number = 0
        while not stop.is_set():
            try:
                name = f"churn-{number}"
                made = write_dataset(name, tmp / "churn" / name, shards=1, rows=50)
                lavender.preview_dataset(made, limit=5)
                lavender.delete_dataset(made)
                counts["churn"] += 1
            except Exception as exc:
                errors[f"churn {type(exc).__name__}: {str(exc)[:120]}"] += 1
            number += 1

    def poll() -> None:
        while not stop.wait(0.1):
            try:
                for progress in lavender.list_iterations(dataset_id):
                    lavender.get_iteration(progress.id)
                lavender.list_datasets()
                counts["polls"] += 1
                samples.append(rss_mb(server.pid))
            except Exception as exc:
                errors[f"poll {type(exc).__name__}: {str(exc)[:120]}"] += 1

    threads = [threading.Thread(target=churn), threading.Thread(target=poll)]
    for thread in threads:
        thread.start()
    until = time.time() + args.seconds
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(8, mp_context=context) as pool:
        futures = [pool.submit(client, url, dataset_id, r, until) for r in [None] * 6 + [0, 1]]
        results = [f.result(timeout=args.seconds + 300) for f in futures]
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    end_rss = rss_mb(server.pid)
    for result in results:
        for error, n in result["errors"].items():
            errors[f"client {error}"] += n
    epochs = sum(r["epochs"] for r in results)
    bad = sum(r["bad"] for r in results)
    server.terminate()
    code = server.wait(timeout=60)
    print(f"load test, {args.seconds:g} s: 8 clients, catalog churn, a poller")
    rounds = f"churn rounds {counts['churn']}; polls {counts['polls']}"
    print(f"  epochs run {epochs} (bad {bad}); {rounds}")
    print(f"  errors {sum(errors.values())}: {dict(errors) or 'none'}")
    peak = max(samples, default=end_rss)
    median = statistics.median(samples) if samples else end_rss
    print(f"  server RSS start {start_rss:.0f} MB, end {end_rss:.0f} MB, peak {peak:.0f} MB, "
          f"median {median:.0f} MB; exit code {code}")  # fmt: skip
    return 0 if not errors and not bad and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
