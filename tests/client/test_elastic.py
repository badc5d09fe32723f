"""Elastic resume end to end: an iteration resumed with another world size deals what was not
completed to the new ranks: every sample once, apart from what the old ranks held in flight
(replayed, and counted here), nothing completed twice.

Datasets have ``uid == position`` (shards written in order).
"""

from __future__ import annotations

import textwrap
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import ClientSettings, Iteration, MixtureSource, Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.protocol.errors import InvalidArgument, IterationBusy, IterationConflict
from tests.client.test_resume import Child, children, write_dataset  # noqa: F401

CHILD = textwrap.dedent(
    """
    import json
    import sys
    import time

    from lavender_flight.client import Iteration
    from lavender_flight.client import api as lavender

    url, iteration_id, rank, world, stuck_after = sys.argv[1:6]
    lavender.init(url, timeout=10)
    iteration = Iteration.resume(iteration_id, rank=int(rank))
    for count, batch in enumerate(iteration, 1):
        print(json.dumps(batch["uid"]), flush=True)
        # a trainer stuck in a step until it is killed: that batch is never completed
        time.sleep(60.0 if count >= int(stuck_after) else 0.02)
    """
)


def take(stream: Iterator[dict], count: int) -> list[int]:
    return [u for _ in range(count) for u in next(stream)["uid"]]


def everything(iteration: Iteration) -> list[int]:
    return [u for batch in iteration for u in batch["uid"]]


def no_repeats(uids: Sequence[int]) -> bool:
    return max(Counter(uids).values(), default=1) == 1


def wait_until(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_four_killed_ranks_resume_as_two(
    client: LavenderClient,
    api_url: str,
    data_dir: Path,
    tmp_path: Path,
    children: list[Child],  # noqa: F811
) -> None:
    total, batch, stuck_after = 4000, 25, 16  # 40 batches a rank: stuck at 40 %
    dataset_id = write_dataset("elastic", data_dir / "main", shards=8, rows=500)
    spec = dict(batch_size=batch, shuffle=True, shuffle_seed=3, world_size=4)
    for rank in range(4):  # created by the job, streamed by its rank processes
        assert Iteration.from_dataset(dataset_id, rank=rank, iteration_id="el4", **spec).id
    script = tmp_path / "rank.py"
    script.write_text(CHILD)
    ranks = [
        Child(script, [api_url, "el4", str(r), "4", str(stuck_after)], tmp_path / f"r{r}.log")
        for r in range(4)
    ]
    children.extend(ranks)
    seen = [child.read_batches(stuck_after) for child in ranks]
    # every rank's acks arrived but the batch it is stuck in
    wait_until(
        lambda: (
            [r.completed for r in lavender.get_iteration("el4").ranks]
            == [(stuck_after - 1) * batch] * 4
        )
    )
    for child in ranks:
        child.kill()
    before = lavender.get_iteration("el4")
    assert before.completed == 4 * (stuck_after - 1) * batch  # 37.5 % completed
    completed = [u for batches in seen for b in batches[:-1] for u in b]
    in_flight = [u for batches in seen for u in batches[-1]]

    resumed = [Iteration.resume("el4", rank=r, world_size=2) for r in range(2)]
    assert [it.spec.world_size for it in resumed] == [4, 4]  # the spec stays as it was made
    streams = [everything(it) for it in resumed]
    assert abs(len(streams[0]) - len(streams[1])) <= batch  # within one batch of each other
    delivered = [u for batches in seen for b in batches for u in b] + streams[0] + streams[1]
    counts = Counter(delivered)
    assert sorted(counts) == list(range(total))  # nothing lost
    twice = sorted(u for u, n in counts.items() if n > 1)
    assert twice == sorted(in_flight)  # only the batches in flight come again: counted
    assert len(twice) == 4 * batch
    assert not set(completed) & set(streams[0] + streams[1])  # nothing completed twice
    after = lavender.get_iteration("el4")
    assert (after.world_size, after.deal, after.total) == (2, 1, total)
    assert (after.completed, after.done) == (total, True)
    assert [r.rank for r in after.ranks] == [0, 1]


def test_two_ranks_stopped_resume_as_three(client: LavenderClient, data_dir: Path) -> None:
    total, batch = 1200, 20
    dataset_id = write_dataset("elastic23", data_dir / "main", shards=4, rows=300)
    first = [
        Iteration.from_dataset(
            dataset_id, batch_size=batch, rank=r, world_size=2, iteration_id="el23"
        )
        for r in range(2)
    ]
    stopped: list[int] = []
    for iteration in first:  # each trains a while, then the job stops cleanly
        stream = iter(iteration)
        stopped += take(stream, 12)
        stream.close()
    assert lavender.get_iteration("el23").completed == len(stopped) == 480
    streams = [everything(Iteration.resume("el23", rank=r, world_size=3)) for r in range(3)]
    sizes = [len(s) for s in streams]
    assert max(sizes) - min(sizes) <= batch and sum(sizes) == total - 480
    assert sorted(stopped + [u for s in streams for u in s]) == list(range(total))
    progress = lavender.get_iteration("el23")
    assert (progress.world_size, progress.completed, progress.done) == (3, total, True)
    # the next epoch is dealt to the three ranks from its start
    again = [everything(Iteration.resume("el23", rank=r)) for r in range(3)]
    assert sorted(u for s in again for u in s) == list(range(total))
    assert lavender.get_iteration("el23").epoch == 1


def test_a_shuffled_filtered_iteration_shrinks_and_grows(
    client: LavenderClient, data_dir: Path
) -> None:
    total, batch = 1500, 16
    dataset_id = write_dataset("elastic-f", data_dir / "main", shards=5, rows=300)
    kept = [u for u in range(total) if u % 3 != 0]
    spec = dict(
        batch_size=batch,
        shuffle=True,
        shuffle_seed=13,
        filters=[("expression", {"expr": "uid % 3 != 0"})],
    )
    seen: list[int] = []
    for rank in range(3):
        it = Iteration.from_dataset(dataset_id, rank=rank, world_size=3, iteration_id="elf", **spec)
        stream = iter(it)
        seen += take(stream, 6)
        stream.close()
    middle = iter(Iteration.resume("elf", rank=1, world_size=2))
    seen += take(middle, 10)
    middle.close()
    iteration = Iteration.resume("elf", rank=0, world_size=2)
    seen += take(iter(iteration), 3)  # closed at once: its 3 batches count as completed
    final = [everything(Iteration.resume("elf", rank=r, world_size=4)) for r in range(4)]
    delivered = seen + [u for s in final for u in s]
    assert no_repeats(delivered) and sorted(delivered) == kept
    progress = lavender.get_iteration("elf")
    assert progress.deal == 2 and progress.world_size == 4
    assert (progress.completed, progress.filtered, progress.done) == (len(kept), 500, True)


def two_sources(data_dir: Path, prefix: str = "mix") -> list[str]:
    """Two datasets of uids 0..399 and 1000..1299."""
    ids = []
    for index, rows in enumerate((400, 300)):
        dataset = lavender.create_dataset(f"{prefix}{index}")
        shardset = lavender.create_shardset(
            dataset.id,
            (data_dir / f"{prefix}{index}").as_uri(),
            [lavender.DatasetColumnOptions(name="uid", type_="int")],
        )
        Writer.get(dataset_id=dataset.id, shardset_id=shardset.id).write(
            [{"uid": index * 1000 + u} for u in range(rows)]
        )
        ids.append(dataset.id)
    return ids


def test_a_mixture_resumes_with_another_world(client: LavenderClient, data_dir: Path) -> None:
    ids = two_sources(data_dir)
    sources = [MixtureSource(ids[0], 1), MixtureSource(ids[1], 1)]
    seen: list[int] = []
    for rank in range(2):
        it = Iteration.from_mixture(
            sources, batch_size=10, on_exhausted="rebalance", shuffle_seed=4, rank=rank,
            world_size=2, iteration_id="mix-el",
        )  # fmt: skip
        stream = iter(it)
        seen += take(stream, 8)
        stream.close()
    lavender.set_mixture_weights("mix-el", {ids[1]: 3.0})
    streams = [everything(Iteration.resume("mix-el", rank=r, world_size=3)) for r in range(3)]
    delivered = seen + [u for s in streams for u in s]
    assert sorted(delivered) == list(range(400)) + [1000 + u for u in range(300)]
    progress = lavender.get_iteration("mix-el")
    assert progress.mixture is not None and progress.done
    assert [s.finished for s in progress.mixture.sources] == [400, 300]


def test_a_server_that_never_streamed_it_reports_a_resized_mixture_alike(
    client: LavenderClient, server: LavenderFlightServer, data_dir: Path, tmp_path: Path
) -> None:
    ids = two_sources(data_dir)
    sources = [MixtureSource(ids[0], 1), MixtureSource(ids[1], 1)]
    spec: dict = dict(batch_size=10, on_exhausted="rebalance", shuffle_seed=4, world_size=2)
    for rank in range(2):
        stream = iter(Iteration.from_mixture(sources, rank=rank, iteration_id="seen", **spec))
        take(stream, 8)
        stream.close()
    lavender.set_mixture_weights("seen", {ids[1]: 3.0})
    for rank in range(3):
        stream = iter(Iteration.resume("seen", rank=rank, world_size=3))
        take(stream, 3)
        stream.close()
    # a closed loop's stream ends on the server a moment later (it notices the cancel): only
    # then is its read-ahead given back, which the other server never held
    wait_until(lambda: all(r.streams == 0 for r in lavender.get_iteration("seen").ranks))
    other_catalog = Catalog(tmp_path / "catalog.db")  # the same file: two servers, one catalog
    other = LavenderFlightServer(LavenderService(other_catalog, allow_memory=True))
    try:
        there = LavenderClient(ClientSettings(f"grpc://127.0.0.1:{other.port}", timeout=30))
        here = lavender.get_iteration("seen")
        # 16 batches before the resize (carried over), 9 after; a loop closed completes its last
        assert (here.world_size, here.deal, here.completed) == (3, 1, 160 + 90)
        assert here.mixture is not None and len(here.mixture.schedule) == 2
        assert sum(s.finished for s in here.mixture.sources) == here.completed
        for found in (there.get_iteration("seen"), there.list_iterations()[0]):
            assert found.mixture == here.mixture
            assert (found.world_size, found.deal, found.total) == (3, 1, here.total)
            assert (found.current, found.completed) == (here.current, here.completed)
        ranks = there.get_iteration("seen").ranks
        assert [r.model_dump(exclude={"read_ahead_limit"}) for r in ranks] == [
            r.model_dump(exclude={"read_ahead_limit"}) for r in here.ranks
        ]
        there.close()
    finally:
        other.shutdown()
        other_catalog.close()


def test_ranks_of_one_new_world_pass_the_same_size(client: LavenderClient, data_dir: Path) -> None:
    dataset_id = write_dataset("elastic-e", data_dir / "main", shards=2, rows=200)
    ranks = [
        Iteration.from_dataset(dataset_id, batch_size=10, rank=r, world_size=2, iteration_id="ele")
        for r in range(2)
    ]
    for iteration in ranks:
        stream = iter(iteration)
        take(stream, 3)
        stream.close()
    assert Iteration.resume("ele", rank=0, world_size=3).id == "ele"
    assert Iteration.resume("ele", rank=2, world_size=3).id == "ele"  # the others find it done
    with pytest.raises(IterationConflict, match="was just resumed with world_size=3 by another"):
        Iteration.resume("ele", rank=1, world_size=4)
    with pytest.raises(InvalidArgument, match="rank 3 is outside iteration ele's world of 3"):
        Iteration.resume("ele", rank=3)
    # while a rank of the new world streams, another size is refused
    stream = iter(Iteration.resume("ele", rank=0))
    try:
        next(stream)
        with pytest.raises(IterationBusy, match="open stream"):
            Iteration.resume("ele", rank=0, world_size=2)
    finally:
        stream.close()


def test_replication_groups_keep_their_world(client: LavenderClient, data_dir: Path) -> None:
    dataset_id = write_dataset("elastic-r", data_dir / "main", shards=1, rows=100)
    it = Iteration.from_dataset(
        dataset_id, batch_size=10, rank=0, world_size=2, replication_pg=[[0, 1]],
        iteration_id="elr",
    )  # fmt: skip
    assert it.id == "elr"
    with pytest.raises(InvalidArgument, match="replication groups"):
        Iteration.resume("elr", rank=0, world_size=3)
