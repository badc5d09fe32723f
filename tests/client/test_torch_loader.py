"""``Iteration.to_torch_dataloader``: a torch ``DataLoader`` over an iteration, in the loop's
process (``num_workers=0``) or in spawned workers that each open their own connection."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

from lavender_flight.client import Iteration, LavenderClient, Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.torch_loader import MAX_RUN, RUN_BYTES, auto_run
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.protocol.errors import InvalidArgument
from tests.conftest import CALL_TIMEOUT
from tests.flight_server.test_security import self_signed

COLUMNS = [
    lavender.DatasetColumnOptions(name="uid", type_="int", description="id"),
    lavender.DatasetColumnOptions(name="text", type_="str"),
    lavender.DatasetColumnOptions(name="score", type_="float32"),
]
SHARDS, ROWS = 4, 700
TOTAL = SHARDS * ROWS
BATCH = 128  # 21 full batches and one of 112
SEED = 77
# torch warns when a loader has more workers than this machine has CPUs (a 1-CPU runner)
MANY_WORKERS = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture
def dataset_id(client: LavenderClient, data_dir: Path) -> str:
    """A dataset of 4 shards x 700 rows; uid == position, ``score == uid / 2``."""
    return write_dataset(data_dir)


def write_dataset(data_dir: Path) -> str:
    """The dataset of ``dataset_id``, written through the default client."""
    dataset = lavender.create_dataset(name="torchy", uid_column_name="uid")
    shardset = lavender.create_shardset(dataset.id, (data_dir / "main").as_uri(), COLUMNS)
    writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset.id)
    for index in range(SHARDS):
        uids = range(index * ROWS, (index + 1) * ROWS)
        writer.write(
            [{"uid": u, "text": f"sample {u}", "score": u / 2} for u in uids], shard_index=index
        )
    return dataset.id


def run_loader(
    dataset_id: str,
    iteration_id: str,
    num_workers: int,
    shuffle: bool,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = BATCH,
    worker_batches: int | None = None,
) -> list[dict[str, Any]]:
    """Every batch of one rank's loader, after checking each as a training loop would see it."""
    iteration = Iteration.from_dataset(
        dataset_id,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=SEED,
        rank=rank,
        world_size=world_size,
        iteration_id=iteration_id,
    )
    loader = iteration.to_torch_dataloader(num_workers=num_workers, worker_batches=worker_batches)
    batches = list(loader)
    assert len(loader) == len(batches)
    for batch in batches:
        assert set(batch) == {"uid", "text", "score"}
        assert isinstance(batch["uid"], torch.Tensor) and batch["uid"].dtype == torch.int64
        assert isinstance(batch["score"], torch.Tensor) and batch["score"].dtype == torch.float32
        assert isinstance(batch["text"], list) and all(isinstance(t, str) for t in batch["text"])
        assert len(batch["uid"]) == len(batch["text"]) == len(batch["score"])
        # the columns of a row stay together
        assert torch.equal(batch["score"], batch["uid"].to(torch.float32) / 2)
        assert batch["text"] == [f"sample {u}" for u in batch["uid"].tolist()]
    sizes = [len(b["uid"]) for b in batches]
    assert all(size == batch_size for size in sizes[:-1]), sizes
    assert 0 < sizes[-1] <= batch_size
    progress = lavender.get_iteration(iteration_id).ranks[rank]
    assert (progress.completed, progress.inflight) == (progress.total, 0)
    assert sum(sizes) == progress.total
    return batches


def values(batch: dict[str, Any]) -> dict[str, list[Any]]:
    """Every value of a batch's columns, as Python lists (tensors compared by value)."""
    return {
        name: column.tolist() if isinstance(column, torch.Tensor) else list(column)
        for name, column in batch.items()
    }


def shared_segments() -> set[str]:
    """The shared-memory segments this process's loaders' workers have in /dev/shm.

    Named after the loop's process (``lf_<its pid>_...``): other jobs on the machine have
    theirs.
    """
    return {path.name for path in Path("/dev/shm").glob(f"lf_{os.getpid()}_*")}


def uids(batches: list[dict[str, Any]]) -> list[int]:
    return [u for batch in batches for u in batch["uid"].tolist()]


def assert_each_once(seen: list[int], expected: range) -> None:
    twice = sorted(u for u, n in Counter(seen).items() if n > 1)
    assert not twice, f"delivered more than once: {twice[:20]}"
    assert sorted(seen) == list(expected)


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_in_process_loader_covers_the_epoch(dataset_id: str, shuffle: bool) -> None:
    batches = run_loader(dataset_id, "loader0", num_workers=0, shuffle=shuffle)
    seen = uids(batches)
    assert_each_once(seen, range(TOTAL))
    if shuffle:
        assert seen != sorted(seen)
    else:
        assert seen == list(range(TOTAL))
    assert [len(b["uid"]) for b in batches] == [BATCH] * (TOTAL // BATCH) + [TOTAL % BATCH]
    progress = lavender.get_iteration("loader0")
    assert (progress.completed, progress.total, progress.done) == (TOTAL, TOTAL, True)


class RecordingReader:
    """A Flight stream reader that keeps every message it read (so its memory stays put)."""

    def __init__(self, inner: flight.FlightStreamReader, kept: list[pa.RecordBatch]) -> None:
        self._inner = inner
        self._kept = kept

    def read_chunk(self) -> flight.FlightStreamChunk:
        chunk = self._inner.read_chunk()
        self._kept.append(chunk.data)
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class RecordingFlight:
    """A Flight client whose ``do_get`` readers record what they read."""

    def __init__(self, inner: flight.FlightClient, kept: list[pa.RecordBatch]) -> None:
        self._inner = inner
        self._kept = kept

    def do_get(self, *args: Any, **kwargs: Any) -> RecordingReader:
        return RecordingReader(self._inner.do_get(*args, **kwargs), self._kept)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_in_process_loader_tensors_are_views_of_the_received_arrow_memory(
    dataset_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[pa.RecordBatch] = []
    connect = LavenderClient.__init__

    def recording(self: LavenderClient, *args: Any, **kwargs: Any) -> None:
        connect(self, *args, **kwargs)
        self.flight = RecordingFlight(self.flight, received)

    monkeypatch.setattr(LavenderClient, "__init__", recording)
    batches = run_loader(dataset_id, "zero-copy", num_workers=0, shuffle=True)
    assert received, "the loader read no Flight message through its connection"
    spans = [
        (buf.address, buf.address + buf.size)
        for message in received
        for column in message.columns
        for buf in column.buffers()
        if buf is not None
    ]
    for batch in batches:
        for name in ("uid", "score"):
            tensor = batch[name]
            start, stop = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
            assert any(a <= start and stop <= b for a, b in spans), f"{name} was copied"


@pytest.mark.slow
@MANY_WORKERS
@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
@pytest.mark.parametrize("run", [None, 1], ids=["runs-by-size", "every-other-batch"])
def test_two_spawned_workers_give_the_same_batches_in_the_same_order(
    dataset_id: str, shuffle: bool, run: int | None
) -> None:
    before = shared_segments()
    alone = run_loader(dataset_id, "workers0", num_workers=0, shuffle=shuffle)
    spawned = run_loader(dataset_id, "workers2", num_workers=2, shuffle=shuffle, worker_batches=run)
    assert_each_once(uids(spawned), range(TOTAL))
    # the loop takes runs of batches from its workers in turn, and worker w streams the
    # rank's runs w, w + 2, ...: the same seed gives the same order with or without workers,
    # and the shared-memory trip from the workers keeps every value of every column
    assert [values(b) for b in spawned] == [values(b) for b in alone]
    assert shared_segments() <= before, "a batch's shared memory outlived the loop"
    progress = lavender.get_iteration("workers2")
    assert (progress.completed, progress.done) == (TOTAL, True)
    assert progress.ranks[0].opened == 2


@pytest.mark.slow
@MANY_WORKERS
def test_workers_stream_runs_of_batches_taken_in_turn_in_the_order_without_workers(
    dataset_id: str,
) -> None:
    # runs of 8 batches of 16 rows: 175 batches, 11 runs for each worker, the last short;
    # every run is one worker's consecutive rows, sent as they lie
    alone = run_loader(dataset_id, "runs0", num_workers=0, shuffle=True, batch_size=16)
    spawned = run_loader(
        dataset_id, "runs2", num_workers=2, shuffle=True, batch_size=16, worker_batches=8
    )
    assert len(spawned) == len(alone) == -(-TOTAL // 16)
    assert [values(b) for b in spawned] == [values(b) for b in alone]
    assert_each_once(uids(spawned), range(TOTAL))
    progress = lavender.get_iteration("runs2")
    assert (progress.completed, progress.done) == (TOTAL, True)


@pytest.mark.slow
@MANY_WORKERS
def test_the_default_run_weighs_about_a_message_by_the_servers_row_estimate(
    dataset_id: str,
) -> None:
    iteration = Iteration.from_dataset(dataset_id, batch_size=BATCH, iteration_id="runs-auto")
    table = lavender.read_dataset("torchy")
    actual = table.nbytes / table.num_rows
    estimate = iteration.row_bytes
    assert estimate is not None and actual / 2 <= estimate <= actual * 2, (estimate, actual)
    # small rows: the longest run; a batch of a message's weight or more: one batch a run
    assert auto_run(BATCH, estimate) == MAX_RUN
    assert auto_run(1024, RUN_BYTES / 1024) == 1
    assert auto_run(1024, RUN_BYTES / 1024 / 3) == 3
    assert auto_run(1024, 10 * RUN_BYTES) == 1
    assert auto_run(BATCH, None) == auto_run(0, estimate) == 1  # no estimate; single samples
    explicit = iteration.to_torch_dataloader(num_workers=2, worker_batches=4)
    assert explicit.dataset.run == 4
    loader = iteration.to_torch_dataloader(num_workers=2)
    assert loader.dataset.run == 1  # picked when the first epoch starts, not before
    assert_each_once(uids(list(loader)), range(TOTAL))
    assert loader.dataset.run == MAX_RUN


def test_a_run_of_no_batches_is_refused_before_any_worker_starts(dataset_id: str) -> None:
    iteration = Iteration.from_dataset(dataset_id, batch_size=BATCH, iteration_id="runs-bad")
    with pytest.raises(InvalidArgument, match="worker_batches must be >= 1, got 0"):
        iteration.to_torch_dataloader(num_workers=2, worker_batches=0)


class Tokenize:
    """A user's collate (run in the workers): tensors, numpy arrays, strings and a tuple."""

    def __call__(self, item: tuple[dict[str, Any], Any]) -> tuple[dict[str, Any], Any]:
        batch, token = item
        ids = np.zeros((len(batch["text"]), 16), dtype=np.int32)
        for row, text in enumerate(batch["text"]):
            raw = text.encode()[:16]
            ids[row, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        made = {
            "uid": batch["uid"] * 3,
            "text": [t.upper() for t in batch["text"]],
            "ids": ids,
            "pair": (batch["score"].to(torch.float64), "tag"),
        }
        return made, token


def run_collated(dataset_id: str, iteration_id: str, num_workers: int) -> list[Any]:
    """Every batch of a shuffled loader whose collate is :class:`Tokenize`."""
    iteration = Iteration.from_dataset(
        dataset_id, batch_size=BATCH, shuffle=True, shuffle_seed=SEED, iteration_id=iteration_id
    )
    loader = iteration.to_torch_dataloader(num_workers=num_workers)
    loader.collate_fn = Tokenize()
    return list(loader)


@pytest.mark.slow
@MANY_WORKERS
def test_a_collate_in_two_workers_gives_what_it_gives_in_the_loop(dataset_id: str) -> None:
    before = shared_segments()
    alone = run_collated(dataset_id, "collate0", num_workers=0)
    spawned = run_collated(dataset_id, "collate2", num_workers=2)
    assert len(spawned) == len(alone) == -(-TOTAL // BATCH)
    for ours, theirs in zip(spawned, alone, strict=True):
        assert set(ours) == {"uid", "text", "ids", "pair"}
        assert ours["uid"].dtype == torch.int64 and torch.equal(ours["uid"], theirs["uid"])
        assert ours["text"] == theirs["text"] and ours["text"][0].startswith("SAMPLE ")
        assert isinstance(ours["ids"], np.ndarray) and ours["ids"].shape == (len(ours["text"]), 16)
        assert np.array_equal(ours["ids"], theirs["ids"])
        assert isinstance(ours["pair"], tuple) and ours["pair"][1] == "tag"
        assert ours["pair"][0].dtype == torch.float64
        assert torch.equal(ours["pair"][0], theirs["pair"][0])
    assert sorted(u // 3 for b in spawned for u in b["uid"].tolist()) == list(range(TOTAL))
    progress = lavender.get_iteration("collate2")
    assert (progress.completed, progress.done) == (TOTAL, True)
    assert shared_segments() <= before, "a batch's shared memory outlived the loop"


@pytest.mark.slow
@MANY_WORKERS
def test_spawned_workers_stay_for_the_next_epoch(dataset_id: str) -> None:
    iteration = Iteration.from_dataset(
        dataset_id, batch_size=BATCH, shuffle=True, shuffle_seed=SEED, iteration_id="persist"
    )
    loader = iteration.to_torch_dataloader(num_workers=2)
    epochs, workers = [], []
    for _ in range(2):
        epochs.append([u for batch in loader for u in batch["uid"].tolist()])
        workers.append([process.pid for process in loader._iterator._workers])
    assert workers[0] == workers[1], "the workers were spawned again for the second epoch"
    for seen in epochs:
        assert_each_once(seen, range(TOTAL))
    assert epochs[0] != epochs[1]  # epoch 1 has an order of its own
    progress = lavender.get_iteration("persist")
    assert progress.completed == TOTAL


@pytest.mark.slow
@MANY_WORKERS
def test_two_ranks_with_two_workers_each_cover_the_epoch_once(dataset_id: str) -> None:
    per_rank = [
        uids(
            run_loader(
                dataset_id, "ddp", 2, shuffle=True, rank=rank, world_size=2, worker_batches=1
            )
        )
        for rank in (0, 1)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert_each_once(per_rank[0] + per_rank[1], range(TOTAL))
    # chunks alternate between ranks: 11 of the 22 batches each
    assert [len(r) for r in per_rank] == [11 * BATCH, 10 * BATCH + TOTAL % BATCH]
    progress = lavender.get_iteration("ddp")
    assert (progress.completed, progress.total, progress.done) == (TOTAL, TOTAL, True)


@pytest.fixture
def tls_url(service: LavenderService, tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A ``grpc+tls://`` server whose certificate is its own CA: its URL and the CA's PEM.

    It runs in this process; the loader's workers are spawned (never forked from it).
    """
    cert, key = self_signed(tmp_path)
    srv = LavenderFlightServer(
        service, "grpc+tls://127.0.0.1:0", tls_certificates=[(cert.read_bytes(), key.read_bytes())]
    )
    yield f"grpc+tls://127.0.0.1:{srv.port}", cert.read_bytes()
    srv.shutdown()


def test_the_loaders_dataset_carries_the_whole_settings(
    tls_url: tuple[str, bytes], reset_client: None, data_dir: Path
) -> None:
    url, ca = tls_url
    lavender.init(url, api_key=None, timeout=CALL_TIMEOUT, tls_root_certs=ca, reconnect_seconds=5)
    iteration = Iteration.from_dataset(write_dataset(data_dir), batch_size=BATCH)
    loader = iteration.to_torch_dataloader(num_workers=2)
    shipped = pickle.loads(pickle.dumps(loader.dataset))  # what each spawned worker gets
    assert shipped.settings == lavender.get_client().settings
    assert (shipped.settings.tls_root_certs, shipped.settings.reconnect_seconds) == (ca, 5.0)


@pytest.mark.slow
@MANY_WORKERS
def test_two_spawned_workers_verify_a_tls_server_with_the_settings_ca(
    tls_url: tuple[str, bytes], reset_client: None, data_dir: Path
) -> None:
    url, ca = tls_url
    lavender.init(url, timeout=CALL_TIMEOUT, tls_root_certs=ca)
    assert not lavender.get_client().settings.disable_server_verification
    dataset_id = write_dataset(data_dir)
    batches = run_loader(dataset_id, "tls-workers", num_workers=2, shuffle=True)
    assert_each_once(uids(batches), range(TOTAL))
    progress = lavender.get_iteration("tls-workers")
    assert (progress.completed, progress.done) == (TOTAL, True)
    assert progress.ranks[0].opened == 2  # both workers streamed over TLS


def test_what_a_killed_worker_wrote_goes_when_the_loop_exits() -> None:
    script = (
        "import os, sys\n"
        "from lavender_flight.client import shipping\n"
        "shipping.sweep_at_exit()\n"
        "import _posixshmem\n"
        "fd = _posixshmem.shm_open(f'/lf_{os.getpid()}_1_left', os.O_CREAT | os.O_RDWR, 0o600)\n"
        "os.close(fd)\n"
        "print(os.getpid())\n"
    )  # a loop's process whose (killed) worker left a segment behind
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert not Path(f"/dev/shm/lf_{done.stdout.strip()}_1_left").exists()


def wait_for(check: Any, seconds: float = 30.0) -> bool:
    """Whether ``check()`` came true within ``seconds`` (polled)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def two_worker_loader(dataset_id: str, iteration_id: str) -> tuple[set[str], Any, Iterator[Any]]:
    """The segments there were, a 2-worker loader of a new iteration, and its epoch's batches."""
    before = shared_segments()
    iteration = Iteration.from_dataset(dataset_id, batch_size=BATCH, iteration_id=iteration_id)
    loader = iteration.to_torch_dataloader(num_workers=2)
    return before, loader, iter(loader)


@pytest.mark.slow
@MANY_WORKERS
def test_a_loader_left_mid_epoch_and_deleted_leaves_no_shared_memory(dataset_id: str) -> None:
    before, loader, batches = two_worker_loader(dataset_id, "left")
    kept = [next(batches) for _ in range(3)]  # the loop keeps batches over shared pages
    workers = list(loader._iterator._workers)
    assert shared_segments() - before, "the workers shipped through no shared segment"
    del batches, loader
    gc.collect()
    assert wait_for(lambda: not any(w.is_alive() for w in workers)), "workers outlived it"
    assert wait_for(lambda: shared_segments() <= before), "shared memory outlived the loader"
    assert [len(b["uid"]) for b in kept] == [BATCH] * 3  # still readable: mapped, unlinked
    assert kept[2]["text"] == [f"sample {u}" for u in kept[2]["uid"].tolist()]


@pytest.mark.slow
@MANY_WORKERS
def test_a_killed_workers_shared_memory_goes_when_the_loop_fails(dataset_id: str) -> None:
    before, loader, batches = two_worker_loader(dataset_id, "killed")
    next(batches)
    victim = loader._iterator._workers[1]
    # torch raises where the loop is when it learns of the death (SIGCHLD): in the loader,
    # or in the loop's own code, where the loader's generator is closed as the loop unwinds
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        os.kill(victim.pid, signal.SIGKILL)
        for _ in batches:
            pass
    batches.close()
    victim.join(timeout=30)
    # the killed worker never unlinks what it wrote; the loop's process did, at the error
    assert not {n for n in shared_segments() if n.startswith(f"lf_{os.getpid()}_{victim.pid}_")}
    survivor = loader._iterator._workers[0]
    del batches, loader
    gc.collect()
    assert wait_for(lambda: not survivor.is_alive()), "the other worker outlived the loader"
    assert wait_for(lambda: shared_segments() <= before), "shared memory outlived the loader"
