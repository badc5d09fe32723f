"""Server memory over many iterations: 100 iterations on one server, its RSS after each.

One server, the ``text`` rows (10 Parquet shards) and a dataset joining them with an
*unaligned* feature shardset (7 shards, rows permuted: joined through the uid index and the
feature cache). The iterations cycle through what holds memory on the server: in order,
shuffled (blocks of 4 shards), joined and shuffled, filtered (keeps half) and
``byte_tokenize``; each is read to its end by a client in this process (Arrow batches of
1024) and left as it is (the server decides when to evict it). After each iteration the
server's process tree RSS is read from ``/proc`` (and the server process's own, apart from
its worker processes); a thread samples the tree every 20 ms for the peak. "Flat" is
judged on the growth of the median RSS from a window of :data:`WINDOW` iterations after the
first :data:`WARM` (every kind has run twice by then, so caches and pools are warm) to the
window of the last :data:`WINDOW`. Each window holds every kind twice; medians, not single
readings: the RSS after one iteration moves within a band of tens of MB with the kind just
run and the allocator's timing (a run read 633-713 MB over 100 iterations, no trend), so
two single readings judged that band, not a trend. The readings of the two windows are
taken once the server has settled (:data:`SETTLE_SECONDS` after the iteration): right
after one, the server keeps up to a quarter of its memory budget (``KEEP_FRACTION``) of
what it freed for the next blocks, by design, and gives it back once idle
(``engine.blocks.IdleRelease``); the growth of the medians read at once is shown beside.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from lavender_flight.flight_server.engine.blocks import RELEASE_IDLE_SECONDS

from .common import (
    PeakSampler,
    lavender_server,
    memory_budget_mb,
    table,
    tree_rss,
    tree_rss_mb,
    write_feature_shards,
    write_text_shards,
)

ITERATIONS = 100
SETTLE_SECONDS = RELEASE_IDLE_SECONDS + 1.0
"""How long after an iteration of the two windows its settled reading is taken."""
WARM = 10
WINDOW = 10
BATCH = 1024
# (label, joined, options of Iteration.from_dataset)
KINDS: list[tuple[str, bool, dict[str, Any]]] = [
    ("in order", False, {}),
    ("shuffled", False, {"shuffle": True}),
    ("joined unaligned, shuffled", True, {"shuffle": True}),
    ("filtered (uid%2==0)", False,
     {"filters": [{"name": "expression", "params": {"expr": "uid % 2 == 0"}}]}),
    ("byte_tokenize", False, {"preprocessors": [{"name": "byte_tokenize"}]}),
]  # fmt: skip


def _consume(dataset_id: str, seed: int, options: dict[str, Any]) -> int:
    rows = 0
    iteration = Iteration.from_dataset(
        dataset_id, batch_size=BATCH, shuffle_seed=seed, format="arrow", **options
    )
    for batch in iteration:
        rows += batch.num_rows
    return rows


def run(rows: int, iterations: int = ITERATIONS) -> dict[str, Any]:
    """Run the iterations; print the RSS figures; return them."""
    with tempfile.TemporaryDirectory(prefix="lf-bench-memory-") as tmp:
        home = Path(tmp)
        write_text_shards(home / "text", rows, 10)
        write_feature_shards(home / "extra-unaligned", rows, 7, shuffle_seed=1)
        with lavender_server(home / "server") as server:
            pid = server.process.pid
            lavender.init(server.url)
            plain = lavender.create_dataset("bench-memory")
            lavender.create_shardset(plain.id, (home / "text").as_uri())
            joined = lavender.create_dataset("bench-memory-joined")
            lavender.create_shardset(joined.id, (home / "text").as_uri(), is_main=True)
            lavender.create_shardset(joined.id, (home / "extra-unaligned").as_uri())
            budget = memory_budget_mb(server)
            start_mb = tree_rss_mb(pid)
            after: list[float] = []  # the process tree (what the machine pays)
            main_after: list[float] = []  # the server process alone
            children = 0
            started = time.perf_counter()
            delivered = 0
            early_at, late_at = window_bounds(iterations)
            settled: dict[int, float] = {}  # by iteration, in the two windows
            main_settled: dict[int, float] = {}
            with PeakSampler(pid) as sampler:
                for index in range(iterations):
                    _, use_joined, options = KINDS[index % len(KINDS)]
                    dataset_id = joined.id if use_joined else plain.id
                    delivered += _consume(dataset_id, index, options)
                    processes = tree_rss(pid)
                    after.append(sum(processes.values()))
                    main_after.append(processes.get(pid, 0.0))
                    children = max(children, len(processes) - 1)
                    if index in early_at or index in late_at:
                        time.sleep(SETTLE_SECONDS)
                        processes = tree_rss(pid)
                        settled[index] = sum(processes.values())
                        main_settled[index] = processes.get(pid, 0.0)
                    if (index + 1) % 20 == 0:
                        print(
                            f"  memory: {index + 1} iterations, server RSS {after[-1]:,.0f} MB",
                            flush=True,
                        )
            seconds = time.perf_counter() - started
    warm = after[min(WARM, len(after)) - 1]
    early, late = [settled[i] for i in early_at], [settled[i] for i in late_at]
    main_early = [main_settled[i] for i in early_at]
    main_late = [main_settled[i] for i in late_at]
    at_once_early, at_once_late = windows(after)
    kinds = [label for label, _, _ in KINDS]
    result: dict[str, Any] = {
        "rows": rows,
        "iterations": iterations,
        "kinds": kinds,
        "delivered_rows": delivered,
        "seconds": seconds,
        "memory_budget_mb": budget,
        "start_mb": start_mb,
        "first_mb": after[0],
        "warm_mb": warm,
        "last_mb": after[-1],
        "max_mb": max(sampler.peak, *after),
        "warm_median_mb": statistics.median(early),
        "last_median_mb": statistics.median(late),
        "growth_mb": statistics.median(late) - statistics.median(early),
        "growth_at_once_mb": statistics.median(at_once_late) - statistics.median(at_once_early),
        "growth_single_mb": after[-1] - warm,
        "main_warm_mb": main_after[min(WARM, len(after)) - 1],
        "main_last_mb": main_after[-1],
        "main_growth_mb": statistics.median(main_late) - statistics.median(main_early),
        "child_processes_max": children,
        "rss_after_each_mb": after,
        "main_rss_after_each_mb": main_after,
    }
    print(
        f"\nMemory: {iterations} iterations on one server ({', '.join(kinds)}, in "
        f"turn; {rows:,} rows each), {seconds:.0f} s; memory budget: "
        + ("not reported" if budget is None else f"{budget:,.0f} MB")
    )
    main = main_after
    warm_at = min(WARM, iterations)
    lines = [
        ["before the first iteration", f"{start_mb:,.0f}", ""],
        ["after the first", f"{result['first_mb']:,.0f}", f"{main[0]:,.0f}"],
        [f"after {warm_at} (warm)", f"{warm:,.0f}", f"{result['main_warm_mb']:,.0f}"],
        [f"after the last ({iterations})", f"{result['last_mb']:,.0f}", f"{main[-1]:,.0f}"],
        ["max (sampled every 20 ms)", f"{result['max_mb']:,.0f}", ""],
        [f"median after {span(early_at)}, settled", f"{result['warm_median_mb']:,.0f}",
         f"{statistics.median(main_early):,.0f}"],
        [f"median after {span(late_at)}, settled", f"{result['last_median_mb']:,.0f}",
         f"{statistics.median(main_late):,.0f}"],
        ["growth of the median", f"{result['growth_mb']:+,.0f}",
         f"{result['main_growth_mb']:+,.0f}"],
        ["(read at once)", f"{result['growth_at_once_mb']:+,.0f}", ""],
        [f"(after {warm_at} to after {iterations})", f"{result['growth_single_mb']:+,.0f}", ""],
    ]  # fmt: skip
    header = ["server RSS", "MB (process tree)", f"MB (server alone; {children} children max)"]
    print(table(lines, header))
    every = max(1, iterations // 10)
    trace = ", ".join(f"{i + 1}: {after[i]:,.0f}" for i in range(every - 1, iterations, every))
    print(f"after iteration (MB): {trace}")
    return result


def window_bounds(iterations: int) -> tuple[range, range]:
    """The iterations (0-based) of the warm window and of the last one.

    :data:`WINDOW` iterations after the first :data:`WARM`, and the last :data:`WINDOW`;
    a run too short for both apart splits what follows the warm-up in two halves.
    """
    if iterations < 2:
        return range(iterations), range(iterations)
    start = min(WARM, iterations - 2)
    if iterations - start >= 2 * WINDOW:
        return range(start, start + WINDOW), range(iterations - WINDOW, iterations)
    middle = start + max(1, (iterations - start) // 2)
    return range(start, middle), range(middle, iterations)


def windows(after: list[float]) -> tuple[list[float], list[float]]:
    """The RSS readings of the warm window and of the last one (see ``window_bounds``)."""
    early, late = window_bounds(len(after))
    return [after[i] for i in early], [after[i] for i in late]


def span(window: range) -> str:
    """Iterations ``11-20`` of a 0-based window, as a reader counts them."""
    return f"{window.start + 1}-{window.stop}" if len(window) > 1 else f"{window.stop}"
