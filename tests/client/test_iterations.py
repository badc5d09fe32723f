"""Iterations end to end: a real server, the Python client, what a training job sees."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.protocol import Dataset
from lavender_flight.protocol.errors import (
    InvalidArgument,
    IterationConflict,
    IterationNotFound,
    ShardsetNotFound,
)
from lavender_flight.protocol.iterations import decode_positions
from tests.conftest import call_options

SHARD_ROWS = [100, 250, 37, 0, 180, 99, 64]
TOTAL = sum(SHARD_ROWS)


@pytest.fixture
def dataset(client: LavenderClient, data_dir: Path) -> Dataset:
    """730 samples in 7 shards of uneven sizes (one empty), plus a feature shardset."""
    ds = lavender.create_dataset("iter")
    main = lavender.create_shardset(
        ds.id,
        (data_dir / "main").as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="text", type_="str"),
            lavender.DatasetColumnOptions(name="vec", type_="fixed_size_list<item: float32>[3]"),
        ],
    )
    feat = lavender.create_shardset(
        ds.id,
        (data_dir / "feat").as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="score", type_="float64"),
        ],
    )
    start = 0
    writer = Writer.get(dataset_id=ds.id, shardset_id=main.id)
    for index, rows in enumerate(SHARD_ROWS):
        uids = list(range(start, start + rows))
        writer.write(
            [{"uid": u, "text": f"t{u}", "vec": [u, u + 0.5, -u]} for u in uids], shard_index=index
        )
        start += rows
    Writer.get(dataset_id=ds.id, shardset_id=feat.id).write(
        [{"uid": u, "score": u / 10} for u in range(TOTAL)]
    )
    return lavender.get_dataset(dataset_id=ds.id)


def uids_of(iteration: Iteration) -> list[list[int]]:
    return [list(batch["uid"]) for batch in iteration]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [10, 32])  # 730 = 73 x 10; 32 does not divide it
def test_every_sample_exactly_once(
    dataset: Dataset, shuffle: bool, world_size: int, batch_size: int
) -> None:
    streams = []
    for rank in range(world_size):
        iteration = Iteration.from_dataset(
            dataset.id,
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=11,
            rank=rank,
            world_size=world_size,
            iteration_id=f"cover-{shuffle}-{world_size}-{batch_size}",
        )
        streams.append(uids_of(iteration))
    everything = [u for stream in streams for batch in stream for u in batch]
    assert sorted(everything) == list(range(TOTAL))
    counts = [sum(len(b) for b in stream) for stream in streams]
    assert max(counts) - min(counts) <= batch_size  # even: at most one batch apart
    for stream in streams:
        assert all(len(b) == batch_size for b in stream[:-1])  # only the last may be short
    if not shuffle and world_size == 1:
        assert everything == list(range(TOTAL))  # shard order
    progress = lavender.get_iteration(f"cover-{shuffle}-{world_size}-{batch_size}")
    assert (progress.total, progress.completed, progress.done) == (TOTAL, TOTAL, True)


def test_seed_decides_the_order(dataset: Dataset) -> None:
    def order(seed: int) -> list[int]:
        it = Iteration.from_dataset(dataset.id, batch_size=50, shuffle=True, shuffle_seed=seed)
        return [u for batch in uids_of(it) for u in batch]

    first, again, other = order(3), order(3), order(4)
    assert first == again
    assert first != other
    assert sorted(first) == sorted(other) == list(range(TOTAL))
    assert first != list(range(TOTAL))


def test_shuffle_without_seed_is_fixed_at_creation(dataset: Dataset) -> None:
    it = Iteration.from_dataset(dataset.id, batch_size=50, shuffle=True, iteration_id="noseed")
    twin = Iteration.from_dataset(dataset.id, batch_size=50, shuffle=True, iteration_id="noseed")
    assert twin.id == it.id
    seen = uids_of(it)
    assert sorted(u for b in seen for u in b) == list(range(TOTAL))


def test_replication_groups_get_identical_streams(dataset: Dataset) -> None:
    groups = [[0, 2], [1, 3]]
    streams = {
        rank: uids_of(
            Iteration.from_dataset(
                dataset.id,
                batch_size=16,
                shuffle=True,
                shuffle_seed=1,
                rank=rank,
                world_size=4,
                replication_pg=groups,
                iteration_id="replicated",
            )
        )
        for rank in range(4)
    }
    assert streams[0] == streams[2] and streams[1] == streams[3]
    assert sorted(u for r in (0, 1) for b in streams[r] for u in b) == list(range(TOTAL))


def test_drop_last_gives_equal_full_batches(dataset: Dataset) -> None:
    streams = [
        uids_of(
            Iteration.from_dataset(
                dataset.id, batch_size=32, drop_last=True, rank=r, world_size=3, iteration_id="dl"
            )
        )
        for r in range(3)
    ]
    assert [len(s) for s in streams] == [7, 7, 7]  # 730 // (32 * 3) = 7 rounds
    assert all(len(b) == 32 for s in streams for b in s)
    assert len({u for s in streams for b in s for u in b}) == 7 * 3 * 32


def test_formats(dataset: Dataset) -> None:
    def first(fmt: str) -> object:
        return next(iter(Iteration.from_dataset(dataset.id, batch_size=4, format=fmt)))

    python = first("python")
    assert python == {
        "uid": [0, 1, 2, 3],
        "text": ["t0", "t1", "t2", "t3"],
        "vec": [[float(u), u + 0.5, float(-u)] for u in range(4)],
        "score": [0.0, 0.1, 0.2, 0.3],
    }
    arrow = first("arrow")
    assert isinstance(arrow, pa.RecordBatch) and arrow.num_rows == 4
    numpy = first("numpy")
    assert (
        isinstance(numpy, dict) and numpy["vec"].shape == (4, 3) and numpy["uid"].dtype == np.int64
    )
    tensors = first("torch")
    assert isinstance(tensors, dict)
    assert tensors["uid"].dtype == torch.int64 and tensors["uid"].tolist() == [0, 1, 2, 3]
    assert tensors["vec"].shape == (4, 3) and tensors["vec"].dtype == torch.float32
    assert tensors["text"] == ["t0", "t1", "t2", "t3"]
    with pytest.raises(InvalidArgument, match="unknown batch format 'pandas'"):
        Iteration.from_dataset(dataset.id, batch_size=4, format="pandas")


def test_projection_and_shardsets(dataset: Dataset) -> None:
    main = dataset.shardsets[0]
    it = Iteration.from_dataset(dataset.id, shardsets=[main.id], batch_size=8, columns=["text"])
    assert it.schema.names == ["uid", "text"]
    assert next(iter(it)) == {"uid": list(range(8)), "text": [f"t{u}" for u in range(8)]}
    with pytest.raises(ShardsetNotFound):
        Iteration.from_dataset(dataset.id, shardsets=["ss-nope"], batch_size=8)
    with pytest.raises(InvalidArgument, match="unknown column"):
        Iteration.from_dataset(dataset.id, columns=["nope"], batch_size=8)


def test_ranks_join_and_conflicts(dataset: Dataset) -> None:
    a = Iteration.from_dataset(dataset.id, batch_size=8, world_size=2, rank=0, iteration_id="job")
    b = Iteration.from_dataset(dataset.id, batch_size=8, world_size=2, rank=1, iteration_id="job")
    assert a.id == b.id == "job" and (a.rank, b.rank) == (0, 1)
    with pytest.raises(
        IterationConflict, match=r"'job' exists with another spec \(batch_size: 8 != 16"
    ):
        Iteration.from_dataset(dataset.id, batch_size=16, world_size=2, rank=0, iteration_id="job")
    with pytest.raises(InvalidArgument, match="world_size=2 needs iteration_id="):
        Iteration.from_dataset(dataset.id, batch_size=8, world_size=2, rank=0)
    with pytest.raises(InvalidArgument, match="rank 2 is outside"):
        Iteration.from_dataset(dataset.id, batch_size=8, world_size=2, rank=2, iteration_id="job")
    with pytest.raises(IterationNotFound):
        Iteration.resume("never-made")
    with pytest.raises(InvalidArgument, match="iteration_id"):
        Iteration.from_dataset(dataset.id, batch_size=8, iteration_id="bad id with spaces")


def test_rank_and_world_from_the_environment(
    dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    it = Iteration.from_dataset(dataset.id, batch_size=8, iteration_id="env")
    assert (it.rank, it.spec.world_size) == (1, 2)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run42")
    first = Iteration.from_dataset(dataset.id, batch_size=8)
    second = Iteration.from_dataset(dataset.id, batch_size=8)
    assert first.id.startswith("run42-") and first.id != second.id  # one per epoch


def test_break_acknowledges_and_a_resume_continues_the_epoch(dataset: Dataset) -> None:
    it = Iteration.from_dataset(dataset.id, batch_size=100, shuffle=True, shuffle_seed=2)
    seen: list[int] = []
    for index, batch in enumerate(it):
        seen.extend(batch["uid"])
        if index == 2:
            break  # closing the loop completes the batch in hand
    progress = lavender.get_iteration(it.id)
    assert progress.completed == 300
    assert progress.current >= 300
    # a new Iteration over it (a restarted job) delivers the rest of the epoch, not a restart
    again = Iteration.resume(it.id)
    rest = [u for batch in again for u in batch["uid"]]
    assert sorted(seen + rest) == list(range(TOTAL))
    assert again.epoch == 0 and lavender.get_iteration(it.id).done


def test_every_new_loop_is_the_next_epoch(dataset: Dataset) -> None:
    it = Iteration.from_dataset(dataset.id, batch_size=100, shuffle=True, shuffle_seed=2)
    orders = [[u for batch in it for u in batch["uid"]] for _ in range(3)]
    assert all(sorted(order) == list(range(TOTAL)) for order in orders)  # never an empty pass
    assert len({tuple(order) for order in orders}) == 3  # each epoch shuffled anew
    assert it.epoch == 2 and lavender.get_iteration(it.id).epoch == 2
    same = Iteration.from_dataset(dataset.id, batch_size=100, shuffle=True, shuffle_seed=2)
    assert [[u for batch in same for u in batch["uid"]] for _ in range(3)] == orders
    fresh = Iteration.from_dataset(dataset.id, batch_size=100, shuffle=True, shuffle_seed=2)
    fresh.set_epoch(1)  # as DistributedSampler.set_epoch: that epoch's order
    assert [u for batch in fresh for u in batch["uid"]] == orders[1]
    fresh.set_epoch(1)  # a finished epoch is never a silent empty pass
    with pytest.raises(InvalidArgument, match="rank 0 finished epoch 1 already"):
        next(iter(fresh))


def test_epochs_bounds_the_passes(dataset: Dataset) -> None:
    it = Iteration.from_dataset(dataset.id, batch_size=250, epochs=2)
    for _ in range(2):
        assert sum(len(batch["uid"]) for batch in it) == TOTAL
    assert lavender.get_iteration(it.id).done
    with pytest.raises(InvalidArgument, match=r"makes 2 epoch\(s\) \(epochs=2\); epoch 2 is past"):
        next(iter(it))


def test_progress_counts_and_inflight_positions(dataset: Dataset) -> None:
    it = Iteration.from_dataset(dataset.id, batch_size=10, iteration_id="watch")
    loop = iter(it)
    first = next(loop)
    second = next(loop)  # asking for it completes the first
    assert first["uid"] == list(range(10)) and second["uid"] == list(range(10, 20))
    loop.close()
    progress = lavender.get_iteration("watch")
    assert progress.completed == 20 and progress.ranks[0].completed == 20
    assert progress.total == TOTAL and not progress.done
    listed = lavender.list_iterations(dataset.id)
    assert listed[0].id == "watch"


def test_progress_bar(dataset: Dataset, capsys: pytest.CaptureFixture[str]) -> None:
    it = Iteration.from_dataset(dataset.id, batch_size=100, progress=True)
    assert sum(len(b["uid"]) for b in it) == TOTAL
    err = capsys.readouterr().err
    assert f"{TOTAL}/{TOTAL}" in err and "samples" in err
    assert len(it) == 8


def test_any_flight_client_can_consume_an_iteration(
    dataset: Dataset, raw_flight: flight.FlightClient
) -> None:
    command = json.dumps(
        {
            "kind": "iteration",
            "iteration_id": "raw",
            "spec": {"dataset_id": dataset.id, "batch_size": 100, "world_size": 2},
        }
    ).encode()
    info = raw_flight.get_flight_info(flight.FlightDescriptor.for_command(command), call_options())
    assert info.total_records == TOTAL and len(info.endpoints) == 2
    seen: Counter[int] = Counter()
    received = 0
    for endpoint in info.endpoints:
        # the endpoint's ticket as is; a client that wants row positions asks for them
        ticket = {**json.loads(endpoint.ticket.ticket), "positions": True}
        reader = raw_flight.do_get(flight.Ticket(json.dumps(ticket).encode()), call_options())
        acked = []
        for chunk in reader:
            metadata = json.loads(chunk.app_metadata.to_pybytes())
            uids = chunk.data.column("uid").to_pylist()
            received += chunk.data.nbytes
            assert decode_positions(metadata).tolist() == uids  # uid == position here
            assert sum(rows for rows, _ in metadata["batches"]) == len(uids)
            seen.update(uids)
            acked.extend(r for _, seq in metadata["batches"] for r in seq)
        rank = json.loads(endpoint.ticket.ticket)["rank"]
        body = json.dumps({"iteration_id": "raw", "rank": rank, "seq": acked}).encode()
        list(raw_flight.do_action(flight.Action("ack", body), call_options()))
    assert sorted(seen) == list(range(TOTAL)) and set(seen.values()) == {1}
    # the epoch's bytes, by the server's estimate from the shards' footers (Flight's field)
    assert received / 2 <= info.total_bytes <= received * 2, (info.total_bytes, received)
    assert lavender.get_iteration("raw").done
    # the rank's epoch is finished: asking again is a clear error, never an empty pass
    with pytest.raises(pa.ArrowInvalid, match="rank 0 finished epoch 0 already"):
        raw_flight.do_get(info.endpoints[0].ticket, call_options()).read_chunk()
    # the next epoch; without the flag the metadata carries no positions (they cost time)
    ticket = {**json.loads(info.endpoints[0].ticket.ticket), "epoch": 1}
    chunk = raw_flight.do_get(
        flight.Ticket(json.dumps(ticket).encode()), call_options()
    ).read_chunk()
    metadata = json.loads(chunk.app_metadata.to_pybytes())
    assert (
        metadata["epoch"] == 1 and "positions" not in metadata and "positions_i64" not in metadata
    )


def test_the_call_that_creates_an_iteration_says_so_and_its_first_loop_asks_nothing_more(
    dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the FlightInfo of the call that made the iteration says it was made (every rank at
    # the start of epoch 0); its first loop need not ask where its rank stands, a round
    # trip less before its first batch. Any other call (joining, reopening) says not.
    asked: list[str] = []
    action = LavenderClient.action

    def counted(self: LavenderClient, name: str, *args: object, **kwargs: object) -> object:
        asked.append(name)
        return action(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LavenderClient, "action", counted)
    first = Iteration.from_dataset(dataset.id, batch_size=50, iteration_id="made-here")
    assert sorted(u for batch in first for u in batch["uid"]) == list(range(TOTAL))
    assert first.epoch == 0
    assert first._info is not None and first._info.created
    assert "get_iteration" not in asked

    # a second Iteration on the id joins: it asks, and learns that rank 0 finished epoch
    # 0 (its loop is epoch 1, not a second pass over epoch 0)
    asked.clear()
    joined = Iteration.from_dataset(dataset.id, batch_size=50, iteration_id="made-here")
    assert sorted(u for batch in joined for u in batch["uid"]) == list(range(TOTAL))
    assert joined.epoch == 1
    assert "get_iteration" in asked

    # through Flight itself: created once, then never again
    command = json.dumps({"kind": "iteration", "iteration_id": "made-here"}).encode()
    info = lavender.get_client().flight.get_flight_info(
        flight.FlightDescriptor.for_command(command), call_options()
    )
    assert json.loads(info.app_metadata)["created"] is False
