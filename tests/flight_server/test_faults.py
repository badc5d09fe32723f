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
from lavender_flight.protocol.iterations import IterationProgress
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


def freed(iteration_id: str) -> IterationProgress:
    """Progress once no stream holds anything (a closed connection frees its samples)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        progress = lavender.get_iteration(iteration_id)
        rank = progress.ranks[0]
        if not rank.streams and not rank.read_ahead and not rank.inflight:
            return progress
        assert time.monotonic() < deadline, f"a stream still holds samples: {rank}"
        time.sleep(0.05)


def test_a_dead_workers_samples_go_back_to_the_queue_at_once(
    leased_client: LavenderClient, data_dir: Path
) -> None:
    dataset_id = write_dataset("leased", data_dir, shards=4, rows=16)
    iteration = Iteration.from_dataset(dataset_id, batch_size=4)
    # worker 0 of 2 takes two messages, acknowledges the first, then dies holding the second
    dead = read_stream(leased_client, iteration.id, 0, 2, messages=2)
    assert len(dead) == 2, "worker 0 got less than two messages"
    acked_by_dead = dead[0][0]
    assert ack(leased_client, iteration.id, dead[0][1]) == len(acked_by_dead)
    progress = freed(iteration.id)  # its connection closed: no lease to wait for
    assert progress.completed == len(acked_by_dead)
    # a claim holds several messages' chunks: the dead worker held the rest of its share
    # (worker 0 of 2: chunks 0, 2, ..., 32 samples), the batch it read and those sent after
    assert len(dead[1][0]) <= progress.ranks[0].pending
    assert progress.ranks[0].pending == 32 - len(acked_by_dead), "its samples are not queued"

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
    assert (progress.completed, progress.ranks[0].pending, progress.done) == (64, 0, True)


@pytest.fixture
def three_second_lease(service: LavenderService) -> Iterator[LavenderFlightServer]:
    srv = LavenderFlightServer(service, "grpc://127.0.0.1:0", lease_seconds=3.0)
    yield srv
    srv.shutdown()


@pytest.mark.slow
def test_a_live_loop_that_pauses_past_the_lease_gets_every_sample_once(
    three_second_lease: LavenderFlightServer, reset_client: None, data_dir: Path
) -> None:
    lavender.init(f"grpc://127.0.0.1:{three_second_lease.port}", timeout=TIMEOUT)
    dataset_id = write_dataset("paused", data_dir, shards=4, rows=500)
    iteration = Iteration.from_dataset(dataset_id, batch_size=20, shuffle=True, shuffle_seed=3)
    uids: list[int] = []
    for count, batch in enumerate(iteration):
        uids.extend(batch["uid"])
        if count == 30:  # an evaluation or a checkpoint: 10 s, over three leases
            time.sleep(10.0)
            rank = lavender.get_iteration(iteration.id).ranks[0]
            assert rank.pending == 0 and rank.streams == 1, "the lease freed a live loop's samples"
            assert rank.inflight == 20  # the batch in hand; the read-ahead stays the stream's
    assert sorted(uids) == list(range(2000)), "samples lost or delivered twice"
    progress = lavender.get_iteration(iteration.id)
    assert (progress.completed, progress.done) == (2000, True)


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
        held = lavender.get_iteration(iteration.id).ranks[0].read_ahead
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
        rank = progress.ranks[0]
        assert (progress.completed, rank.read_ahead, rank.pending) == (len(acked), 0, held)
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
def test_a_sigkilled_worker_process_frees_its_samples_at_once(
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

    freed(iteration.id)  # well before the lease would end: its connection closed
    alive = read_stream(leased_client, iteration.id, 1, 2, messages=1000)
    for _, seq in alive:
        ack(leased_client, iteration.id, seq)
    everything = acked + [u for uids, _ in alive for u in uids]
    assert not [u for u, n in Counter(everything).items() if n > 1]
    assert sorted(everything) == list(range(64))
    assert lavender.get_iteration(iteration.id).done
