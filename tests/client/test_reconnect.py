"""The server dies under a running loop and comes back: the loop waits for it, reconnects and
goes on where it was; if it does not come back in time, the loop says what was not recorded."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from lavender_flight.client.acks import MAX_UNSENT_BATCHES
from lavender_flight.protocol.errors import ServerUnavailable
from tests.client.test_resume import serve, servers, write_dataset  # noqa: F401
from tests.flight_server.test_cli import STOP_TIMEOUT, Served

ROWS, BATCH = 3000, 20


def kill(served: Served) -> None:
    served.process.send_signal(signal.SIGKILL)
    assert served.process.wait(timeout=STOP_TIMEOUT) == -signal.SIGKILL


@pytest.mark.slow
def test_a_loop_rides_out_a_server_killed_and_restarted(
    servers: list[Served],  # noqa: F811
    reset_client: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    home = tmp_path / "home"
    url = serve(servers, home)
    port = int(url.rsplit(":", 1)[1])
    lavender.init(url, timeout=10, reconnect_seconds=30)
    dataset_id = write_dataset("rides", tmp_path / "data", shards=6, rows=ROWS // 6)
    iteration = Iteration.from_dataset(dataset_id, batch_size=BATCH, shuffle=True, shuffle_seed=5)
    delivered: list[int] = []
    halfway = threading.Event()
    errors: list[BaseException] = []

    def train() -> None:
        try:
            for count, batch in enumerate(iteration):
                delivered.extend(batch["uid"])
                if count == 40:
                    halfway.set()
                time.sleep(0.01)
        except BaseException as exc:
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="lavender_flight.client"):
        loop = threading.Thread(target=train)
        loop.start()
        assert halfway.wait(30)
        kill(servers[0])
        at_kill = len(delivered)
        time.sleep(1.5)  # the loop runs on through what it had, then waits for the server
        # reports cannot be sent: the loop ran at most 16 batches ahead of them, and that
        # (with the batch in hand) is all a restart can hand it again
        ran_on = (len(delivered) - at_kill) // BATCH
        assert ran_on <= MAX_UNSENT_BATCHES + 2, f"the loop ran {ran_on} batches past the kill"
        serve(servers, home, port=port)  # back on the same address, the same catalog
        loop.join(timeout=60)
    assert not loop.is_alive() and not errors, errors
    assert sorted(delivered) == list(range(ROWS)), "samples lost, or delivered twice"
    assert not [u for u, n in Counter(delivered).items() if n > 1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 4, warnings  # a line when it goes, one when it is back; not per batch
    progress = lavender.get_iteration(iteration.id)
    assert (progress.completed, progress.done) == (ROWS, True)


@pytest.mark.slow
def test_a_server_that_stays_away_ends_the_loop_with_one_clear_error(
    servers: list[Served],  # noqa: F811
    reset_client: None,
    tmp_path: Path,
) -> None:
    url = serve(servers, tmp_path / "home")
    lavender.init(url, timeout=5, reconnect_seconds=2)
    dataset_id = write_dataset("away", tmp_path / "data", shards=6, rows=ROWS // 6)
    iteration = Iteration.from_dataset(dataset_id, batch_size=BATCH)
    loop = iter(iteration)
    for _ in range(10):
        next(loop)
    kill(servers[0])
    started = time.monotonic()
    # said by the stream, or by the reports when the loop runs on through what it had
    # received (more than 16 batches past the first failed report)
    pattern = r"did not come back within 2 s.*; \d+ completed sample\(s\)( of .* rank 0)? were not"
    with pytest.raises(ServerUnavailable, match=pattern) as gone:
        for _ in loop:
            pass
    assert time.monotonic() - started < 15
    assert "\n" not in str(gone.value)
