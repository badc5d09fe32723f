"""Progress means what a training loop consumed, and the server's read-ahead stays small.

The server sends ahead of a loop (that reports what it takes) about half a second of the
loop's pace, at least two batches (``ReadAhead``): that is all a crash or a pushback repeats.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

from lavender_flight.client import Iteration, LavenderClient
from lavender_flight.client import api as lavender
from lavender_flight.flight_server.engine import ReadAhead
from tests.client.test_resume import write_dataset

ROWS, BATCH, STEP = 5000, 8, 0.01


def test_two_slow_ranks_keep_progress_on_the_loop_and_a_small_read_ahead(
    client: LavenderClient, data_dir: Path
) -> None:
    dataset_id = write_dataset("progress", data_dir / "main", shards=5, rows=ROWS // 5)
    delivered: dict[int, list[int]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def train(rank: int) -> None:
        try:
            iteration = Iteration.from_dataset(
                dataset_id, batch_size=BATCH, rank=rank, world_size=2, iteration_id="slow"
            )
            for batch in iteration:
                delivered[rank].extend(batch["uid"])
                time.sleep(STEP)  # a training step
        except BaseException as exc:
            errors.append(exc)

    ranks = [threading.Thread(target=train, args=(r,)) for r in (0, 1)]
    for thread in ranks:
        thread.start()
    budget = ReadAhead()
    pace = BATCH / STEP  # samples per second a rank takes, at most
    bound = max(budget.min_batches * BATCH, int(2 * pace * budget.seconds))  # doubling slack
    polls, pushed = 0, None
    started = time.monotonic()
    while any(t.is_alive() for t in ranks):
        try:
            progress = lavender.get_iteration("slow")
        except Exception:
            time.sleep(0.05)  # not created yet
            continue
        for rank in progress.ranks:
            if not rank.streams:
                continue
            polls += 1
            # where the loop is: at most the batch in hand and one not reported yet
            assert rank.current - rank.completed - rank.filtered - rank.failed <= 2 * BATCH
            assert rank.inflight <= 2 * BATCH
            if rank.read_ahead_limit is None:
                # the stream has sent its whole share and ended on the server (the rank's
                # row keeps it until the loop completes what it holds): no window left
                assert rank.current + rank.read_ahead == rank.total, rank
                continue
            assert rank.read_ahead_limit <= bound
            assert rank.read_ahead <= rank.read_ahead_limit + BATCH, rank
        if pushed is None and time.monotonic() - started > 1.0:
            pushed = lavender.pushback("slow")
            assert pushed <= 2 * (bound + 2 * BATCH), f"pushback returned {pushed} samples"
        time.sleep(0.1)
    for thread in ranks:
        thread.join(timeout=60)
    assert not errors, errors
    assert polls > 10 and pushed is not None and pushed > 0
    both = delivered[0] + delivered[1]
    assert not [u for u, n in Counter(both).items() if n > 1], "delivered twice"
    assert sorted(both) == list(range(ROWS))
    done = lavender.get_iteration("slow")
    assert (done.completed, done.read_ahead, done.done) == (ROWS, 0, True)
