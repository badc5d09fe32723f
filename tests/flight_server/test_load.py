"""Load: 8 client processes iterate at once (6 iterations of their own, 2 ranks of a shared
one, several epochs each) while a dashboard-like poller asks for progress. No errors, every
sample accounted for, and the server's memory stays flat.
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from tests.client.test_resume import write_dataset
from tests.flight_server.test_cli import (  # noqa: F401  (launch is a fixture)
    Launcher,
    launch,
    lavender_flight_command,
)
from tests.flight_server.test_faults import SERVING

pytestmark = pytest.mark.slow

ROWS = 4 * 400
EPOCHS = 6
SOLO_CLIENTS = 6
RUN_TIMEOUT = 120.0


def run_client(url: str, dataset_id: str, rank: int | None, epochs: int) -> dict[str, Any]:
    """One client process: ``epochs`` full passes, acknowledging as it goes.

    ``rank`` None: a new iteration of its own per epoch; 0 or 1: that rank of the shared
    iteration of the epoch (world size 2).
    """
    lavender.init(url, timeout=30)
    seen: list[list[int]] = []
    ids = []
    for epoch in range(epochs):
        if rank is None:
            iteration = Iteration.from_dataset(dataset_id, batch_size=16, shuffle=True)
        else:
            iteration = Iteration.from_dataset(
                dataset_id,
                batch_size=16,
                shuffle=True,
                shuffle_seed=epoch,
                rank=rank,
                world_size=2,
                iteration_id=f"shared-{epoch}",
            )
        uids = [u for batch in iteration for u in batch["uid"]]
        seen.append(uids)
        ids.append(iteration.id)
    return {"rank": rank, "ids": ids, "uids": seen}


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from ``/proc``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_eight_clients_and_a_poller_for_several_epochs(
    launch: Launcher,  # noqa: F811
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    served = launch(
        [*lavender_flight_command(), "serve", "--no-ui", "--port", "0", "--workers", "0",
         "--data-home", str(tmp_path / "home"), "--storage-root", str(tmp_path)]
    )  # fmt: skip
    url = served.wait_for(SERVING).group(1)
    lavender.init(url, timeout=30)
    try:
        dataset_id = write_dataset("load", tmp_path / "data", shards=4, rows=ROWS // 4)
        poll_errors: list[str] = []
        polls = 0
        memory: list[int] = []
        stop = threading.Event()

        def poll() -> None:  # what the dashboard does: progress of every iteration, often
            nonlocal polls
            while not stop.wait(0.05):
                try:
                    for progress in lavender.list_iterations(dataset_id):
                        lavender.get_iteration(progress.id)
                    polls += 1
                    memory.append(rss_kib(served.process.pid))
                except Exception as exc:
                    poll_errors.append(f"{type(exc).__name__}: {exc}")

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        started = time.monotonic()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(SOLO_CLIENTS + 2, mp_context=context) as pool:
            futures = [
                pool.submit(run_client, url, dataset_id, rank, EPOCHS)
                for rank in [None] * SOLO_CLIENTS + [0, 1]
            ]
            results = [f.result(timeout=RUN_TIMEOUT) for f in futures]
        elapsed = time.monotonic() - started
        stop.set()
        poller.join(timeout=10)

        assert not poll_errors, poll_errors[:5]
        assert polls > 10, f"the poller got only {polls} rounds in {elapsed:.1f}s"
        for result in results[:SOLO_CLIENTS]:  # own iterations: every epoch is every sample
            for uids in result["uids"]:
                assert sorted(uids) == list(range(ROWS))
        for epoch in range(EPOCHS):  # the shared one: the two ranks split each epoch
            both = results[-2]["uids"][epoch] + results[-1]["uids"][epoch]
            assert not [u for u, n in Counter(both).items() if n > 1]
            assert sorted(both) == list(range(ROWS))
        ids = {i for result in results for i in result["ids"]}
        assert len(ids) == SOLO_CLIENTS * EPOCHS + EPOCHS
        for progress in lavender.list_iterations(dataset_id):
            assert (progress.completed, progress.total, progress.done) == (ROWS, ROWS, True)
            assert not any(progress.inflight.values())

        # memory: the last third of the run holds no more than the middle third, plus 30%
        assert len(memory) >= 9, f"only {len(memory)} memory samples"
        third = len(memory) // 3
        middle = statistics.median(memory[third : 2 * third])
        end = statistics.median(memory[2 * third :])
        for name, value in (("rss_middle_kib", middle), ("rss_end_kib", end),
                            ("polls", polls), ("seconds", round(elapsed, 1))):  # fmt: skip
            record_property(name, value)
        assert end <= middle * 1.3, f"server RSS grew from {middle} KiB to {end} KiB"
    finally:
        lavender._client = None
    assert served.stop() == 0
