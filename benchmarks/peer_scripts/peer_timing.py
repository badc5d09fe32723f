"""What the streaming peers' scripts share (they import it from their own folder, in the
peers' venvs): one timed pass of a loader, and the JSON line they print. Never imports
Lavender Flight."""

import json
import resource
import time
from collections.abc import Iterable


def timed_pass(loader: Iterable, started: float, row_bytes: int) -> dict:
    """Read a loader to its end: rows, bytes, seconds and the first batch's time since
    ``started`` (the dataset's and loader's construction included)."""
    rows, first = 0, 0.0
    for batch in loader:
        if not rows:
            first = time.perf_counter() - started
        rows += len(batch)
    return {
        "rows": rows,
        "bytes": rows * row_bytes,
        "seconds": time.perf_counter() - started,
        "first": first,
    }


def report(write_seconds: float, cases: list) -> None:
    """Print the result line the benchmark reads, with this process's and its workers' RSS."""
    print(
        json.dumps(
            {
                "write_seconds": write_seconds,
                "cases": cases,
                "client_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "workers_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        ),
        flush=True,
    )
