"""A stopping server ends in bounded time, even while a client holds a stream it does not read,
and what the streams held is saved: a resume delivers everything not acknowledged."""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.protocol import iterations, wire
from tests.flight_server.test_cli import (  # noqa: F401  (launch is a fixture)
    Launcher,
    launch,
    lavender_flight_command,
)

pytestmark = pytest.mark.slow

GRACE = 1.0
SHARDS, ROWS = 4, 20_000
TEXT = "x" * 500  # 40 MB in memory: far more than gRPC buffers for a client that stops reading
TIMEOUT = 30.0


@pytest.fixture
def reset(reset_client: None) -> None:
    """Close the module-level client at the end."""


def write_big_dataset(location: Path) -> str:
    dataset = lavender.create_dataset("big")
    shardset = lavender.create_shardset(
        dataset.id,
        location.as_uri(),
        [{"name": "uid", "type": "int"}, {"name": "text", "type": "str"}],
    )
    writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset.id)
    for index in range(SHARDS):
        uids = pa.array(range(index * ROWS, (index + 1) * ROWS), pa.int64())
        writer.write(pa.table({"uid": uids, "text": pa.array([TEXT] * ROWS)}), shard_index=index)
    return dataset.id


def test_sigterm_with_a_stream_nobody_reads_ends_within_the_grace(
    launch: Launcher,  # noqa: F811
    reset: None,
    tmp_path: Path,
) -> None:
    args = [*lavender_flight_command(), "--no-ui", "--port", "0", "--data-home",
            str(tmp_path / "home"), "--storage-root", str(tmp_path),
            "--shutdown-grace", str(GRACE)]  # fmt: skip
    served = launch(args)
    client = lavender.init(served.wait_until_serving(), timeout=TIMEOUT)
    dataset_id = write_big_dataset(tmp_path / "big")
    iteration = Iteration.from_dataset(dataset_id, batch_size=1000)
    ticket = iterations.IterationTicket(iteration_id=iteration.id, rank=0)
    reader = client.flight.do_get(flight.Ticket(wire.encode(ticket)), client.options(None))
    first = reader.read_chunk()  # one message read and acknowledged, then no more reading
    assert first.app_metadata is not None
    meta = json.loads(first.app_metadata.to_pybytes())
    client.action_json(
        "ack",
        {"iteration_id": iteration.id, "rank": 0,
         "seq": [r for _, ranges in meta["batches"] for r in ranges]},
    )  # fmt: skip
    acked = first.data.column("uid").to_pylist()
    time.sleep(1.0)  # the server fills every buffer and blocks writing the next message

    started = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    code = served.process.wait(timeout=GRACE + 20)
    elapsed = time.monotonic() - started
    stderr = served.rest_of_stderr()
    assert code == 0, stderr
    assert re.search(r"^  parked   \d+ in-flight samples$", stderr, re.MULTILINE), stderr
    # the stream really was stuck (else this test proves nothing) and its connection cut
    assert (
        f"  stopped  1 connections with calls still open after the {GRACE:g}s "
        "--shutdown-grace were cut (clients not reading their streams)"
    ) in stderr.splitlines(), stderr
    assert "ending anyway" not in stderr  # it stopped by itself once cut
    assert elapsed < GRACE + 4.0, f"SIGTERM took {elapsed:.1f}s with a {GRACE}s grace"
    reader.cancel()
    client.close()

    again = launch(args)
    lavender.init(again.wait_until_serving(), timeout=TIMEOUT)
    progress = lavender.get_iteration(iteration.id)
    assert (progress.completed, progress.ranks[0].inflight) == (len(acked), 0)
    rest = [
        u
        for batch in Iteration.from_dataset(dataset_id, batch_size=1000, iteration_id=iteration.id)
        for u in batch["uid"]
    ]
    assert not [u for u, n in Counter(acked + rest).items() if n > 1], "delivered twice"
    assert sorted(acked + rest) == list(range(SHARDS * ROWS))
    assert lavender.get_iteration(iteration.id).completed == SHARDS * ROWS
    started = time.monotonic()
    assert again.stop(signal.SIGTERM) == 0  # nobody holds a stream: no grace to wait
    assert time.monotonic() - started < GRACE + 3.0
    assert "  stopped  " not in again.rest_of_stderr()
