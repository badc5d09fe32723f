"""Shared pieces of the benchmarks: data, servers in their own processes, timing, tables."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def text_rows(start: int, count: int, width: int = 100, seed: int = 0) -> pa.Table:
    """``uid`` + a ``width``-character random text column, built without Python per row."""
    rng = np.random.default_rng([seed, start])
    letters = rng.integers(97, 123, size=count * width, dtype=np.uint8)
    offsets = np.arange(0, (count + 1) * width, width, dtype=np.int32)
    text = pa.StringArray.from_buffers(count, pa.py_buffer(offsets), pa.py_buffer(letters))
    return pa.table(
        {"uid": pa.array(np.arange(start, start + count, dtype=np.int64)), "text": text}
    )


def shard_bounds(rows: int, shards: int) -> list[tuple[int, int]]:
    """``(start, count)`` of each of ``shards`` shards of ``rows`` rows (empty ones left out).

    Every benchmark data set splits its rows this way, so two sets of the same rows and
    shard count have the same shard boundaries.
    """
    per = -(-rows // shards)
    bounds = [(index * per, min(per, rows - index * per)) for index in range(shards)]
    return [(start, count) for start, count in bounds if count > 0]


def write_text_shards(folder: Path, rows: int, shards: int) -> None:
    """``rows`` text rows in ``shards`` Parquet files named ``shard.N.parquet``."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (start, count) in enumerate(shard_bounds(rows, shards)):
        pq.write_table(text_rows(start, count), folder / f"shard.{index:08d}.parquet")


def feature_rows(rows: int, seed: int = 7) -> pa.Table:
    """uids ``0..rows-1`` in order + ``score`` (float32) + ``label`` (int64): a feature table."""
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "uid": pa.array(np.arange(rows, dtype=np.int64)),
            "score": pa.array(rng.random(rows, dtype=np.float32)),
            "label": pa.array(rng.integers(0, 10, rows, dtype=np.int64)),
        }
    )


def write_feature_shards(
    folder: Path, rows: int, shards: int, shuffle_seed: int | None = None
) -> float:
    """The :func:`feature_rows` of the uids of ``rows`` text rows in ``shards`` Parquet files.

    Without ``shuffle_seed`` the rows keep the uid order, so with the text shards' count the
    shards are *aligned* with them (same boundaries, same uid order); with it, the rows are
    first permuted by ``numpy.random.default_rng(shuffle_seed)`` (an *unaligned* shardset:
    every shard holds uids from all over the range). Returns Arrow bytes per row.
    """
    folder.mkdir(parents=True, exist_ok=True)
    features = feature_rows(rows)
    if shuffle_seed is not None:
        features = features.take(np.random.default_rng(shuffle_seed).permutation(rows))
    for index, (start, count) in enumerate(shard_bounds(rows, shards)):
        pq.write_table(features.slice(start, count), folder / f"shard.{index:08d}.parquet")
    return features.nbytes / rows


@dataclass
class Server:
    """A server subprocess, its URL and the first lines it logged after them (its banner)."""

    process: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Terminate it (kill if it lingers)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _drain(pipe: IO[str], log: list[str], keep: int = 200) -> None:
    for line in pipe:
        if len(log) < keep:
            log.append(line.rstrip("\n"))


def _start(
    args: list[str], pattern: str, stream: str, timeout: float = 60, cwd: Path = ROOT
) -> Server:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAVENDER_FLIGHT_")}
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        text=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
        stderr=subprocess.PIPE if stream == "stderr" else None,
    )
    pipe = process.stdout if stream == "stdout" else process.stderr
    assert pipe is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = pipe.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            server = Server(process, match.group(1))
            # keep reading what it logs so a full pipe never blocks it
            threading.Thread(target=_drain, args=(pipe, server.log), daemon=True).start()
            return server
    process.kill()
    raise RuntimeError(f"server {args} did not start")


# flags every benchmark server gets (``python -m benchmarks run --memory-mb N`` adds
# ``--memory-mb N``); set once by the command line before any suite runs
SERVER_FLAGS: list[str] = []


def server_has_flag(flag: str) -> bool:
    """Whether ``lavender-flight serve --help`` lists ``flag`` (this checkout's server)."""
    done = subprocess.run(
        [sys.executable, "-m", "lavender_flight.flight_server", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return re.search(rf"(^|\s){re.escape(flag)}\b", done.stdout) is not None


# a banner line such as "  memory   budget 2048 MiB (...)": the server's memory budget
_BUDGET = re.compile(r"\bbudget\b\D{0,20}?(\d+(?:\.\d+)?)\s*(MiB|MB|GiB|GB)\b", re.IGNORECASE)


def memory_budget_mb(server: Server, wait: float = 2.0) -> float | None:
    """The memory budget the server reports, in MB, else None.

    From ``--memory-mb`` when the benchmark passed it, else from a banner line that names a
    budget (``... budget 2048 MiB ...``); the banner is read for up to ``wait`` seconds.
    MB here are MiB, as in the RSS figures (``/proc`` counts KiB) and the server's flags.
    """
    if "--memory-mb" in SERVER_FLAGS:
        return float(SERVER_FLAGS[SERVER_FLAGS.index("--memory-mb") + 1])
    deadline = time.monotonic() + wait
    while True:
        for line in list(server.log):
            match = _BUDGET.search(line)
            if match:
                value = float(match.group(1))
                return value * (1024 if match.group(2).lower().startswith("g") else 1)
        if time.monotonic() > deadline or server.process.poll() is not None:
            return None
        time.sleep(0.05)


@contextmanager
def lavender_server(home: Path, *extra: str) -> Iterator[Server]:
    """``lavender-flight serve`` in its own process on a free port.

    File shardsets may live anywhere under ``home``'s parent folder. Every server gets the
    benchmark's :data:`SERVER_FLAGS` first.
    """
    server = _start(
        [
            sys.executable,
            "-m",
            "lavender_flight.flight_server",
            "serve",
            "--no-ui",
            "--port",
            "0",
            "--data-home",
            str(home),
            "--storage-root",  # the benchmarks write their shards beside the data home
            str(home.parent),
            "--log-level",
            "WARNING",
            *SERVER_FLAGS,
            *extra,
        ],
        r"serving (grpc://\S+)",
        "stderr",
    )
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def bare_server(folder: Path) -> Iterator[Server]:
    """The bare Flight server in its own process."""
    server = _start(
        [sys.executable, "-m", "benchmarks.bare_flight", str(folder)], r"PORT (\d+)", "stdout"
    )
    server.url = f"grpc://127.0.0.1:{server.url}"
    try:
        yield server
    finally:
        server.stop()


def tree_rss(pid: int) -> dict[int, float]:
    """RSS in MB of a process and of each of its descendants, by pid, read from ``/proc``."""
    found: dict[int, float] = {}
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    found[current] = int(line.split()[1]) / 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                stack.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue
    return found


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its descendants, in MB (0 once gone)."""
    return sum(tree_rss(pid).values())


class PeakSampler:
    """Samples a process tree's RSS every 20 ms in a thread; ``peak`` in MB."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while self.pid is not None and not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Measure:
    """Medians over repetitions of one case."""

    name: str
    samples_per_s: float
    mb_per_s: float
    first_batch_s: float
    rows: int
    runs: list[float] = field(default_factory=list)


def measure(name: str, run: Callable[[], tuple[int, int, float]], repeat: int) -> Measure:
    """Run ``run`` (which returns rows, bytes and seconds to first batch) ``repeat`` times."""
    rates, mbs, firsts, rows = [], [], [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        rows, size, first = run()
        elapsed = time.perf_counter() - start
        rates.append(rows / elapsed)
        mbs.append(size / elapsed / 1e6)
        firsts.append(first)
    return Measure(
        name,
        statistics.median(rates),
        statistics.median(mbs),
        statistics.median(firsts),
        rows,
        rates,
    )


def table(rows: list[list[str]], header: list[str], left: int = 1) -> str:
    """A plain-text table; the first ``left`` columns are left-aligned, the others right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
