"""Faults: a client that dies holding samples (the lease), a truncated shard, and a server
stopped with SIGTERM mid-iteration. Nothing acknowledged is lost or delivered twice.

Datasets here have ``uid == position`` (see ``tests/client/test_resume.py``).
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.flight as flight
import pytest

from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.protocol import iterations, wire
from lavender_flight.protocol.errors import LavenderError, ServerError
from tests.client.test_resume import Child, children, write_dataset  # noqa: F401
from tests.flight_server.test_cli import (  # noqa: F401  (launch is a fixture)
    Launcher,
    launch,
    lavender_flight_command,
)

LEASE = 0.5
TIMEOUT = 10.0


@pytest.fixture
def leased(service: LavenderService) -> Iterator[LavenderFlightServer]:
    """A server whose streams lose their samples after half a second of silence."""
    srv = LavenderFlightServer(service, "grpc://127.0.0.1:0", lease_seconds=LEASE)
    yield srv
    srv.shutdown()


@pytest.fixture
def leased_client(leased: LavenderFlightServer, reset_client: None) -> LavenderClient:
    return lavender.init(f"grpc://127.0.0.1:{leased.port}", timeout=TIMEOUT)


def read_stream(
    client: LavenderClient, iteration_id: str, worker: int, num_workers: int, messages: int
) -> list[tuple[list[int], list[list[int]]]]:
    """Up to ``messages`` messages of one worker's stream: uids and seq ranges of each."""
    ticket = iterations.IterationTicket(
        iteration_id=iteration_id, rank=0, worker=worker, num_workers=num_workers
    )
    reader = client.flight.do_get(flight.Ticket(wire.encode(ticket)), client.options(TIMEOUT))
    got = []
    try:
        for _ in range(messages):
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            assert chunk.app_metadata is not None
            meta = json.loads(chunk.app_metadata.to_pybytes())
            seq = [r for _, ranges in meta["batches"] for r in ranges]
            got.append((chunk.data.column("uid").to_pylist(), seq))
    finally:
        reader.cancel()  # what a killed client's connection does
    return got


def ack(client: LavenderClient, iteration_id: str, seq: list[list[int]]) -> int:
    answer = client.action_json("ack", {"iteration_id": iteration_id, "rank": 0, "seq": seq})
    return int(answer["completed"])


def test_a_dead_workers_samples_go_back_to_the_queue_after_the_lease(
    leased_client: LavenderClient, data_dir: Path
) -> None:
    dataset_id = write_dataset("leased", data_dir, shards=4, rows=16)
    iteration = Iteration.from_dataset(dataset_id, batch_size=4)
    # worker 0 of 2 takes work, acknowledges its first message, then dies holding the rest
    dead = read_stream(leased_client, iteration.id, 0, 2, messages=1)
    assert dead, "worker 0 got nothing"
    acked_by_dead = [u for uids, _ in dead for u in uids]
    assert ack(leased_client, iteration.id, [s for _, seq in dead for s in seq]) == len(
        acked_by_dead
    )
    held = lavender.get_iteration(iteration.id).ranks[0].inflight
    assert held > 0, "the dead worker held nothing when it died"

    time.sleep(LEASE * 2)
    progress = lavender.get_iteration(iteration.id)
    assert (progress.ranks[0].inflight, progress.ranks[0].pending) == (0, held)

    # the surviving worker gets its own chunks and the dead worker's, once
    alive = read_stream(leased_client, iteration.id, 1, 2, messages=1000)
    uids_alive = [u for uids, _ in alive for u in uids]
    for _, seq in alive:
        ack(leased_client, iteration.id, seq)
    everything = acked_by_dead + uids_alive
    twice = [u for u, n in Counter(everything).items() if n > 1]
    assert not twice, f"delivered twice: {twice}"
    assert sorted(everything) == list(range(64))
    progress = lavender.get_iteration(iteration.id)
    assert (progress.completed, progress.ranks[0].inflight, progress.done) == (64, 0, True)


def test_a_live_stream_keeps_its_samples_within_the_lease(
    leased_client: LavenderClient, data_dir: Path
) -> None:
    dataset_id = write_dataset("kept", data_dir, shards=2, rows=16)
    iteration = Iteration.from_dataset(dataset_id, batch_size=4)
    read_stream(leased_client, iteration.id, 0, 2, messages=1)
    held = lavender.get_iteration(iteration.id).ranks[0].inflight
    assert held > 0
    # asked right away (well within the lease): still held, nothing pending
    progress = lavender.get_iteration(iteration.id)
    assert (progress.ranks[0].inflight, progress.ranks[0].pending) == (held, 0)


def test_without_a_lease_samples_stay_with_their_stream(
    client: LavenderClient, data_dir: Path
) -> None:
    dataset_id = write_dataset("unleased", data_dir, shards=2, rows=16)
    iteration = Iteration.from_dataset(dataset_id, batch_size=4)
    read_stream(client, iteration.id, 0, 2, messages=1)
    held = lavender.get_iteration(iteration.id).ranks[0].inflight
    time.sleep(LEASE * 2)
    assert lavender.get_iteration(iteration.id).ranks[0].inflight == held


# -- truncated and corrupt shards ---------------------------------------------------------


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncated", "corrupt-footer"])
def test_damaged_shard_is_skipped_or_stops_the_iteration_by_policy(
    client: LavenderClient, data_dir: Path, damage: str
) -> None:
    dataset_id = write_dataset("damaged", data_dir, shards=3, rows=20)
    (shard,) = sorted(data_dir.glob("*00001.parquet"))
    if damage == "truncated":
        cut_in_half(shard)
    else:
        data = bytearray(shard.read_bytes())
        data[-12:-4] = b"\xff" * 8  # the footer length: nonsense
        shard.write_bytes(bytes(data))

    skipping = Iteration.from_dataset(dataset_id, batch_size=8, skip_on_failure=True)
    uids = [u for batch in skipping for u in batch["uid"]]
    assert sorted(uids) == [*range(20), *range(40, 60)]
    progress = lavender.get_iteration(skipping.id)
    assert (progress.completed, progress.failed, progress.done) == (40, 20, True)

    strict = Iteration.from_dataset(dataset_id, batch_size=8)
    with pytest.raises(LavenderError) as stopped:
        list(strict)
    assert shard.name in str(stopped.value)
    assert not isinstance(stopped.value, ServerError), stopped.value
    after = lavender.get_iteration(strict.id)
    assert after.failed == 0 and after.completed < 60


# -- SIGTERM ------------------------------------------------------------------------------

SERVING = re.compile(r"^Lavender Flight serving (grpc://[\w.\-]+:(\d+))\s*$")


@pytest.mark.slow
def test_sigterm_mid_iteration_parks_in_flight_work_and_keeps_acks(
    launch: Launcher,  # noqa: F811
    tmp_path: Path,
) -> None:
    home, data = tmp_path / "home", tmp_path / "data"
    args = [*lavender_flight_command(), "serve", "--no-ui", "--port", "0",
            "--data-home", str(home), "--storage-root", str(tmp_path)]  # fmt: skip
    served = launch(args)
    url = served.wait_for(SERVING).group(1)
    try:
        client = lavender.init(url, timeout=TIMEOUT)
        dataset_id = write_dataset("graceful", data, shards=4, rows=25)
        iteration = Iteration.from_dataset(dataset_id, batch_size=5)
        ticket = iterations.IterationTicket(iteration_id=iteration.id, rank=0)
        reader = client.flight.do_get(flight.Ticket(wire.encode(ticket)), client.options(None))
        first = reader.read_chunk()
        assert first.app_metadata is not None
        meta = json.loads(first.app_metadata.to_pybytes())
        acked = first.data.column("uid").to_pylist()
        ack(client, iteration.id, [r for _, ranges in meta["batches"] for r in ranges])
        held = lavender.get_iteration(iteration.id).ranks[0].inflight
        assert held > 0

        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=10) == 0, served.rest_of_stderr()
        assert time.monotonic() - started < 5.0
        stderr = served.rest_of_stderr()
        assert f"parked   {held} in-flight samples" in stderr
        reader.cancel()
        client.close()

        again = launch(args)
        lavender.init(again.wait_for(SERVING).group(1), timeout=TIMEOUT)
        progress = lavender.get_iteration(iteration.id)
        assert (progress.completed, progress.ranks[0].inflight) == (len(acked), 0)
        rest = [u for batch in Iteration.from_dataset(
            dataset_id, batch_size=5, iteration_id=iteration.id
        ) for u in batch["uid"]]  # fmt: skip
        assert sorted(acked + rest) == list(range(100))
        assert lavender.get_iteration(iteration.id).completed == 100
    finally:
        if lavender._client is not None:
            lavender._client.close()
        lavender._client = None


DYING_WORKER = """
import json, sys, time
import pyarrow.flight as flight
from lavender_flight.client import ClientSettings, LavenderClient
from lavender_flight.protocol import iterations, wire

url, iteration_id = sys.argv[1:3]
client = LavenderClient(ClientSettings(url, timeout=10))
ticket = iterations.IterationTicket(iteration_id=iteration_id, rank=0, worker=0, num_workers=2)
reader = client.flight.do_get(flight.Ticket(wire.encode(ticket)), client.options(None))
chunk = reader.read_chunk()
meta = json.loads(chunk.app_metadata.to_pybytes())
seq = [r for _, ranges in meta["batches"] for r in ranges]
client.action_json("ack", {"iteration_id": iteration_id, "rank": 0, "seq": seq})
print(json.dumps(chunk.data.column("uid").to_pylist()), flush=True)
time.sleep(60)  # holding the rest of its share until it is killed
"""


@pytest.mark.slow
def test_a_sigkilled_worker_process_does_not_hold_samples_past_the_lease(
    leased_client: LavenderClient,
    leased: LavenderFlightServer,
    data_dir: Path,
    tmp_path: Path,
    children: list[Child],  # noqa: F811
) -> None:
    dataset_id = write_dataset("killed-worker", data_dir, shards=4, rows=16)
    iteration = Iteration.from_dataset(dataset_id, batch_size=4)
    script = tmp_path / "worker.py"
    script.write_text(DYING_WORKER)
    child = Child(
        script, [f"grpc://127.0.0.1:{leased.port}", iteration.id], tmp_path / "worker.log"
    )
    children.append(child)
    (acked,) = child.read_batches(1)
    child.kill()
    assert child.process.returncode == -signal.SIGKILL
    assert lavender.get_iteration(iteration.id).completed == len(acked)

    deadline = time.monotonic() + TIMEOUT
    while lavender.get_iteration(iteration.id).ranks[0].inflight:
        assert time.monotonic() < deadline, "the dead worker still holds samples"
        time.sleep(0.1)
    alive = read_stream(leased_client, iteration.id, 1, 2, messages=1000)
    for _, seq in alive:
        ack(leased_client, iteration.id, seq)
    everything = acked + [u for uids, _ in alive for u in uids]
    assert not [u for u, n in Counter(everything).items() if n > 1]
    assert sorted(everything) == list(range(64))
    assert lavender.get_iteration(iteration.id).done
