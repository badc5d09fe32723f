"""Mixtures end to end: several datasets drawn by weight through a real server.

Every dataset has its own uid range (source ``i``: ``i * 100_000 + position``), so a uid says
where a sample came from. Tolerances are binomial: a source of weight ``w`` among ``n``
samples is within four standard deviations, ``4 * sqrt(w * (1 - w) / n)`` (0.018 for
``w = 0.3`` over 10,000 samples).
"""

from __future__ import annotations

import math
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import ClientSettings, Iteration, MixtureSource, Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.protocol.errors import InvalidArgument, SchemaMismatch
from tests.client.test_resume import serve, wait_for_completed
from tests.flight_server.test_cli import STOP_TIMEOUT, Served

COLUMNS = [
    lavender.DatasetColumnOptions(name="uid", type_="int"),
    lavender.DatasetColumnOptions(name="text", type_="str"),
]
STRIDE = 100_000


def write(name: str, folder: Path, rows: int, source: int, shards: int = 3, **extra: str) -> str:
    """A dataset of ``rows`` samples in ``shards`` shards, uids ``source * STRIDE + i``."""
    columns = COLUMNS + [lavender.DatasetColumnOptions(name=k, type_=v) for k, v in extra.items()]
    dataset = lavender.create_dataset(name)
    shardset = lavender.create_shardset(dataset.id, (folder / name).as_uri(), columns)
    writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset.id)
    per = -(-rows // shards)
    for index in range(shards):
        uids = range(index * per, min(rows, (index + 1) * per))
        samples = [{"uid": source * STRIDE + u, "text": f"{name} {u}"} for u in uids]
        for sample in samples:
            sample.update({k: ("1" if v == "str" else 1) for k, v in extra.items()})
        writer.write(samples, shard_index=index)
    return dataset.id


def source_of(uid: int) -> int:
    return uid // STRIDE


def uids(iteration: Iteration, batches: int | None = None) -> list[int]:
    found: list[int] = []
    for count, batch in enumerate(iteration):
        found += batch["uid"]
        if batches is not None and count + 1 >= batches:
            break
    return found


def within(share: float, weight: float, n: int) -> bool:
    return abs(share - weight) <= 4 * math.sqrt(weight * (1 - weight) / n)


def shares(found: Sequence[int], sources: int) -> list[float]:
    counts = Counter(source_of(u) for u in found)
    return [counts[s] / len(found) for s in range(sources)]


@pytest.fixture
def big(client: LavenderClient, data_dir: Path) -> list[str]:
    """Three datasets of 8,000, 4,000 and 3,000 samples."""
    return [write(n, data_dir, rows, i) for i, (n, rows) in enumerate(
        [("web", 8000), ("books", 4000), ("code", 3000)])]  # fmt: skip


@pytest.fixture
def small(client: LavenderClient, data_dir: Path) -> list[str]:
    """Two datasets of 600 and 300 samples."""
    return [write("large", data_dir, 600, 0), write("little", data_dir, 300, 1)]


@pytest.mark.parametrize(
    "weights", [(0.7, 0.3), (0.5, 0.3, 0.2)], ids=["two sources", "three sources"]
)
def test_proportions_follow_the_weights_over_10000_samples(
    big: list[str], weights: tuple[float, ...]
) -> None:
    sources = [MixtureSource(d, w) for d, w in zip(big, weights, strict=False)]
    iteration = Iteration.from_mixture(
        sources, batch_size=100, shuffle_seed=5, source_column="source"
    )
    assert iteration.row_bytes is None  # a mixture's rows are not estimated
    found: list[int] = []
    named: list[str] = []
    for batch in iteration:
        found += batch["uid"]
        named += batch["source"]
        if len(found) >= 10_000:
            break
    found, named = found[:10_000], named[:10_000]
    for got, want in zip(shares(found, len(weights)), weights, strict=True):
        assert within(got, want, len(found)), (shares(found, len(weights)), weights)
    assert all(big[source_of(u)] == s for u, s in zip(found, named, strict=True))
    assert max(Counter(found).values()) == 1
    # the samples of each source come shuffled, as from_dataset shuffles them
    web = [u for u in found if source_of(u) == 0]
    assert web != sorted(web)


def test_the_same_seed_gives_the_same_order(big: list[str]) -> None:
    def order(seed: int) -> list[int]:
        sources = [MixtureSource(big[0], 1), MixtureSource(big[1], 2)]
        return uids(Iteration.from_mixture(sources, batch_size=64, shuffle_seed=seed), 40)

    first = order(21)
    assert order(21) == first
    assert order(22) != first


def test_stop_ends_when_a_source_runs_out(small: list[str]) -> None:
    iteration = Iteration.from_mixture(
        [MixtureSource(small[0], 0.5), MixtureSource(small[1], 0.5)],
        batch_size=32,
        shuffle_seed=3,
        on_exhausted="stop",
        iteration_id="mix-stop",
    )
    found = uids(iteration)
    assert max(Counter(found).values()) == 1  # each sample at most once
    little = [u for u in found if source_of(u) == 1]
    assert sorted(little) == [STRIDE + i for i in range(300)]  # it ran out: every sample once
    assert source_of(found[-1]) == 1  # the epoch ended with its last sample
    progress = lavender.get_iteration("mix-stop")
    assert (progress.total, progress.completed, progress.done) == (len(found), len(found), True)
    assert progress.mixture is not None
    assert [s.exhausted for s in progress.mixture.sources] == [False, True]
    assert [s.finished for s in progress.mixture.sources] == [len(found) - 300, 300]


def test_cycle_reshuffles_a_source_that_runs_out(small: list[str]) -> None:
    iteration = Iteration.from_mixture(
        [MixtureSource(small[0], 0.5), MixtureSource(small[1], 0.5)],
        batch_size=32,
        shuffle_seed=3,
        on_exhausted="cycle",
        iteration_id="mix-cycle",
    )
    found = uids(iteration)
    large = [u for u in found if source_of(u) == 0]
    assert sorted(large) == list(range(600))  # it completed one pass: that ended the epoch
    little = [u for u in found if source_of(u) == 1]
    passes = [little[i : i + 300] for i in range(0, len(little), 300)]
    assert len(passes) >= 2
    for seen in passes:  # each pass: every sample once, shuffled anew
        assert len(set(seen)) == len(seen)
        if len(seen) == 300:
            assert sorted(seen) == [STRIDE + i for i in range(300)]
    assert passes[0] != passes[1][: len(passes[0])]
    progress = lavender.get_iteration("mix-cycle")
    assert progress.mixture is not None
    assert progress.mixture.sources[1].passes == len(passes)
    assert progress.completed == len(found) and progress.done


def test_rebalance_goes_on_with_the_others(small: list[str]) -> None:
    iteration = Iteration.from_mixture(
        [MixtureSource(small[0], 0.5), MixtureSource(small[1], 0.5)],
        batch_size=32,
        shuffle_seed=3,
        on_exhausted="rebalance",
    )
    found = uids(iteration)
    assert sorted(found) == list(range(600)) + [STRIDE + i for i in range(300)]
    last_little = max(i for i, u in enumerate(found) if source_of(u) == 1)
    assert all(source_of(u) == 0 for u in found[last_little + 1 :])
    assert len(found) - last_little > 100  # the large one went on alone


def test_ranks_share_a_mixture_exactly_once(small: list[str]) -> None:
    streams = [
        uids(
            Iteration.from_mixture(
                [MixtureSource(small[0], 1), MixtureSource(small[1], 3)],
                batch_size=25,
                shuffle_seed=8,
                on_exhausted="rebalance",
                rank=rank,
                world_size=2,
                iteration_id="mix-ranks",
            )
        )
        for rank in (0, 1)
    ]
    assert sorted(streams[0] + streams[1]) == list(range(600)) + [STRIDE + i for i in range(300)]
    assert abs(len(streams[0]) - len(streams[1])) <= 25


def test_a_source_keeps_its_own_filters(small: list[str]) -> None:
    iteration = Iteration.from_mixture(
        [
            MixtureSource(small[0], 1),
            MixtureSource(small[1], 1, filters=[("expression", {"expr": "uid % 3 == 0"})]),
        ],
        batch_size=40,
        shuffle_seed=2,
        on_exhausted="rebalance",
        iteration_id="mix-filtered",
    )
    batches = list(iteration)
    found = [u for b in batches for u in b["uid"]]
    kept = [STRIDE + i for i in range(300) if (STRIDE + i) % 3 == 0]
    assert sorted(found) == list(range(600)) + kept
    assert all(len(b["uid"]) == 40 for b in batches[:-1])  # batches stay full
    progress = lavender.get_iteration("mix-filtered")
    assert (progress.completed, progress.filtered, progress.done) == (700, 200, True)


def test_the_sources_columns_must_agree(client: LavenderClient, data_dir: Path) -> None:
    plain = write("plain", data_dir, 50, 0)
    wider = write("wider", data_dir, 50, 1, score="float64")
    with pytest.raises(SchemaMismatch, match=r"mixture source 1 \(dataset 'wider'\) has column "
                       r"'score' that mixture source 0 \(dataset 'plain'\) lacks"):  # fmt: skip
        Iteration.from_mixture([MixtureSource(plain), MixtureSource(wider)], batch_size=8)
    other = write("other", data_dir, 50, 2, text2="str")
    with pytest.raises(SchemaMismatch, match="has no column 'score'"):
        Iteration.from_mixture([MixtureSource(wider), MixtureSource(other)], batch_size=8)
    numbers = lavender.create_dataset("numbers")
    shardset = lavender.create_shardset(
        numbers.id,
        (data_dir / "numbers").as_uri(),
        [lavender.DatasetColumnOptions(name="uid", type_="int"),
         lavender.DatasetColumnOptions(name="text", type_="int32")],
    )  # fmt: skip
    Writer.get(dataset_id=numbers.id, shardset_id=shardset.id).write([{"uid": 1, "text": 2}])
    with pytest.raises(
        SchemaMismatch,
        match=r"column 'text' of mixture source 1 \(dataset "
        r"'numbers'\) is int32, of mixture source 0 \(dataset 'plain'\) string",
    ):
        Iteration.from_mixture([MixtureSource(plain), MixtureSource(numbers.id)], batch_size=8)
    # choosing the same columns makes them agree
    found = uids(
        Iteration.from_mixture(
            [MixtureSource(plain), MixtureSource(wider, columns=["text"])],
            batch_size=8,
            on_exhausted="rebalance",
        )
    )
    assert len(found) == 100


def test_mixtures_that_cannot_work_are_refused(small: list[str]) -> None:
    with pytest.raises(InvalidArgument, match="is a source of the mixture twice"):
        Iteration.from_mixture([MixtureSource(small[0]), MixtureSource(small[0])], batch_size=8)
    with pytest.raises(InvalidArgument, match="weights are all 0"):
        Iteration.from_mixture([MixtureSource(small[0], 0), MixtureSource(small[1], 0)],
                               batch_size=8)  # fmt: skip
    with pytest.raises(InvalidArgument, match="weight: Input should be greater than or equal"):
        Iteration.from_mixture([MixtureSource(small[0], -1)], batch_size=8)
    plain = Iteration.from_dataset(small[0], batch_size=8, iteration_id="not-a-mixture")
    assert plain.id == "not-a-mixture"
    with pytest.raises(InvalidArgument, match="is not a mixture"):
        lavender.set_mixture_weights("not-a-mixture", {small[0]: 1.0})
    mixed = Iteration.from_mixture([MixtureSource(small[0])], batch_size=8, iteration_id="one")
    assert mixed.id == "one"
    with pytest.raises(InvalidArgument, match=r"'nope' is not a source of mixture one"):
        lavender.set_mixture_weights("one", {"nope": 1.0})


def test_new_weights_show_in_the_proportions_after_them(big: list[str]) -> None:
    iteration = Iteration.from_mixture(
        [MixtureSource(big[0], 0.8), MixtureSource(big[1], 0.2)],
        batch_size=50,
        shuffle_seed=9,
        on_exhausted="rebalance",
        iteration_id="mix-live",
    )
    stream = iter(iteration)
    try:
        found: list[int] = []
        for _ in range(40):  # a loop of some pace: the server reads about 0.5 s ahead of it
            found += next(stream)["uid"]
            time.sleep(0.01)
        changed = lavender.set_mixture_weights("mix-live", {big[0]: 0.2, big[1]: 0.8})
        assert changed.epoch == 0 and changed.from_seq % 50 == 0
        assert len(found) <= changed.from_seq <= len(found) + 4000  # past what was read ahead
        assert changed.weights == {big[0]: 0.2, big[1]: 0.8}
        for batch in stream:
            found += batch["uid"]
    finally:
        stream.close()
    assert sorted(found) == list(range(8000)) + [STRIDE + i for i in range(4000)]
    before, after = found[: changed.from_seq], found[changed.from_seq : changed.from_seq + 3000]
    assert within(shares(before, 2)[1], 0.2, len(before))
    assert within(shares(after, 2)[1], 0.8, len(after))
    progress = lavender.get_iteration("mix-live")
    assert progress.mixture is not None
    schedule = progress.mixture.schedule
    assert [(c.epoch, c.from_seq, c.weights[big[1]]) for c in schedule] == [
        (0, 0, 0.2),
        (0, changed.from_seq, 0.8),
    ]
    assert schedule[0].at < schedule[1].at
    assert [s.weight for s in progress.mixture.sources] == [0.2, 0.8]
    assert progress.done and progress.completed == 12_000


# -- the server dies after a weight change -----------------------------------------------


@pytest.fixture
def servers() -> Iterator[list[Served]]:
    """Server processes of a test; any still running at teardown is stopped (or killed)."""
    started: list[Served] = []
    yield started
    for served in started:
        served.close()


@pytest.mark.slow
def test_a_resume_after_a_server_kill_replays_the_same_order(
    servers: list[Served], reset_client: None, tmp_path: Path
) -> None:
    home, batch = tmp_path / "home", 50
    lavender.init(serve(servers, home), timeout=10, reconnect_seconds=1)
    ids = [write("web", tmp_path / "data", 3000, 0), write("books", tmp_path / "data", 2000, 1)]
    sources = [MixtureSource(ids[0], 0.8), MixtureSource(ids[1], 0.2)]
    spec: dict[str, Any] = dict(batch_size=batch, shuffle_seed=77, on_exhausted="rebalance")
    stream = iter(Iteration.from_mixture(sources, iteration_id="killed-mix", **spec))
    seen = [u for _ in range(10) for u in next(stream)["uid"]]
    changed = lavender.set_mixture_weights("killed-mix", {ids[0]: 0.2, ids[1]: 0.8})
    while len(seen) < changed.from_seq + 600:  # well into the new weights
        seen += next(stream)["uid"]
    wait_for_completed("killed-mix", len(seen) - batch)  # all but the batch the loop is in
    time.sleep(0.6)
    completed = lavender.get_iteration("killed-mix").completed
    assert completed == len(seen) - batch

    servers[0].process.send_signal(signal.SIGKILL)
    assert servers[0].process.wait(timeout=STOP_TIMEOUT) == -signal.SIGKILL
    stream.close()  # its last report cannot reach the dead server
    lavender.init(serve(servers, home), timeout=10)
    restarted = lavender.get_iteration("killed-mix")
    assert restarted.completed == completed
    assert restarted.mixture is not None
    assert [c.from_seq for c in restarted.mixture.schedule] == [0, changed.from_seq]
    resumed = uids(Iteration.resume("killed-mix", rank=0))

    # an uninterrupted run of the same seed, the same change at the same seq
    reference = Iteration.from_mixture(sources, iteration_id="reference", **spec)
    again = lavender.set_mixture_weights(reference.id, changed.weights, at=changed.from_seq)
    assert (again.epoch, again.from_seq, again.total) == (0, changed.from_seq, changed.total)
    expected = uids(reference)
    assert seen == expected[: len(seen)]
    # the resume delivers the rest in the same order, the batch in flight replayed first
    assert resumed == expected[completed:]
    replayed = len(seen) - completed
    assert replayed == batch
    assert sorted(expected) == list(range(3000)) + [STRIDE + i for i in range(2000)]
    done = lavender.get_iteration("killed-mix")
    assert (done.completed, done.done) == (len(expected), True)


def test_a_change_through_another_server_reaches_this_ones_streams(
    big: list[str], server: LavenderFlightServer, tmp_path: Path
) -> None:
    other_catalog = Catalog(tmp_path / "catalog.db")  # the same file: two servers, one catalog
    other = LavenderFlightServer(LavenderService(other_catalog, allow_memory=True))
    try:
        here = lavender.get_client()
        there = LavenderClient(ClientSettings(f"grpc://127.0.0.1:{other.port}", timeout=30))
        sources = [MixtureSource(big[0], 0.8), MixtureSource(big[1], 0.2)]
        spec: dict[str, Any] = dict(batch_size=50, shuffle_seed=31, on_exhausted="rebalance")
        stream = iter(Iteration.from_mixture(sources, iteration_id="two-nodes", **spec))
        try:
            found = [u for _ in range(10) for u in next(stream)["uid"]]
            changed = there.set_mixture_weights("two-nodes", {big[0]: 0.2, big[1]: 0.8})
            for batch in stream:  # streamed by the first server, which learns of the change
                found += batch["uid"]
        finally:
            stream.close()
        reference = Iteration.from_mixture(sources, iteration_id="two-nodes-ref", client=here,
                                           **spec)  # fmt: skip
        again = here.set_mixture_weights(reference.id, changed.weights, at=changed.from_seq)
        assert again.from_seq == changed.from_seq
        assert found == uids(reference)
        there.close()
    finally:
        other.shutdown()
        other_catalog.close()
