"""Deleting what live iterations read: refused naming them, or ``force`` ends them first.

And the listings the dashboard pages through: ``list_iterations`` with a state filter,
offset and limit, and ``list_nodes``.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.flight_server import LavenderFlightServer
from lavender_flight.protocol import Dataset
from lavender_flight.protocol.errors import (
    DatasetNotFound,
    IterationBusy,
    IterationNotFound,
    ShardsetNotFound,
)
from tests.flight_server.test_cli import (  # noqa: F401  (launch is a fixture)
    Launcher,
    launch,
    lavender_flight_command,
)

ROWS = 2000
TIMEOUT = 30.0


def write(dataset_name: str, data_dir: Path) -> Dataset:
    """A dataset of 2,000 uids in 4 shards and a feature shardset ``score``."""
    dataset = lavender.create_dataset(dataset_name)
    main = lavender.create_shardset(
        dataset.id, (data_dir / dataset_name / "main").as_uri(), [{"name": "uid", "type": "int"}]
    )
    feature = lavender.create_shardset(
        dataset.id,
        (data_dir / dataset_name / "feature").as_uri(),
        [{"name": "uid", "type": "int"}, {"name": "score", "type": "float64"}],
    )
    writer = Writer.get(dataset_id=dataset.id, shardset_id=main.id)
    for index in range(4):
        uids = pa.array(range(index * ROWS // 4, (index + 1) * ROWS // 4), pa.int64())
        writer.write(pa.table({"uid": uids}), shard_index=index)
    Writer.get(dataset_id=dataset.id, shardset_id=feature.id).write(
        pa.table({"uid": pa.array(range(ROWS), pa.int64()), "score": [u / 2 for u in range(ROWS)]})
    )
    return lavender.get_dataset(dataset.id)


@pytest.fixture
def dataset(client: LavenderClient, data_dir: Path) -> Dataset:
    """The dataset of :func:`write`."""
    return write("ds", data_dir)


class Loops:
    """Training loops that took a few batches and hold their streams open.

    Every one is closed at the end of the test, passed or failed: a stream left open would
    keep the test server from shutting down.
    """

    def __init__(self) -> None:
        self.streams: list[Generator[dict, None, None]] = []

    def start(self, dataset_id: str, iteration_id: str, **options: object) -> Iterator[dict]:
        """A loop over a new iteration that took three batches."""
        iteration = Iteration.from_dataset(
            dataset_id,
            batch_size=10,
            iteration_id=iteration_id,
            **options,  # type: ignore[arg-type]
        )
        stream = iter(iteration)
        assert isinstance(stream, Generator)
        self.streams.append(stream)
        for _ in range(3):
            next(stream)
        return stream

    def close(self) -> None:
        for stream in self.streams:
            try:
                stream.close()
            except Exception:  # the iteration is gone: what it says is the test's business
                pass


@pytest.fixture
def loops(client: LavenderClient) -> Iterator[Loops]:
    """Loops closed at teardown (before the server stops)."""
    started = Loops()
    yield started
    started.close()


def loop_error(stream: Iterator[dict]) -> BaseException:
    """What the loop gets when it goes on (within a few seconds)."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            next(stream)
            time.sleep(0.01)
    except BaseException as exc:
        return exc
    pytest.fail("the loop went on for 30 s")


def test_a_dataset_with_a_live_iteration_is_refused_naming_it(
    dataset: Dataset, loops: Loops
) -> None:
    stream = loops.start(dataset.id, "live")
    with pytest.raises(IterationBusy) as refused:
        lavender.delete_dataset(dataset.id)
    assert str(refused.value) == (
        f"dataset {dataset.id} has a live iteration: live (1 open stream); stop the job "
        "that reads it, or delete with force=True (which ends it first: its readers get "
        "IterationNotFound)"
    )
    next(stream)  # nothing changed: the loop goes on
    assert lavender.get_dataset(dataset.id).total_samples == ROWS
    assert lavender.get_iteration("live").total == ROWS


def test_two_live_iterations_are_named_with_their_streams(dataset: Dataset, loops: Loops) -> None:
    loops.start(dataset.id, "one")
    loops.start(dataset.id, "two", world_size=2, rank=1)
    with pytest.raises(IterationBusy, match=r"has 2 live iterations: (two|one) \(1 open stream\)"):
        lavender.delete_dataset(dataset.id)


def test_force_ends_the_iterations_then_deletes_the_dataset(
    dataset: Dataset, loops: Loops, caplog: pytest.LogCaptureFixture
) -> None:
    stream = loops.start(dataset.id, "live")
    lavender.get_iteration("live")
    done = Iteration.from_dataset(dataset.id, batch_size=500, iteration_id="done")
    assert sum(len(b["uid"]) for b in done) == ROWS
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert lavender.delete_dataset(dataset.id, force=True).deleted == dataset.id
        error = loop_error(stream)
    assert isinstance(error, IterationNotFound), repr(error)
    assert "live" in str(error) and "\n" not in str(error)
    assert time.monotonic() - started < 10  # at once, not after the reconnect window
    assert [r.getMessage() for r in caplog.records if "live" in r.getMessage()] == []
    with pytest.raises(DatasetNotFound):
        lavender.get_dataset(dataset.id)
    for iteration_id in ("live", "done"):
        with pytest.raises(IterationNotFound):
            lavender.get_iteration(iteration_id)
    assert lavender.list_iterations() == []


def test_a_busy_iteration_is_refused_then_forced(dataset: Dataset, loops: Loops) -> None:
    stream = loops.start(dataset.id, "live")
    with pytest.raises(IterationBusy, match="iteration live has 1 open stream"):
        lavender.delete_iteration("live")
    next(stream)
    assert lavender.delete_iteration("live", force=True).deleted == "live"
    error = loop_error(stream)
    assert isinstance(error, IterationNotFound), repr(error)
    assert "\n" not in str(error)
    assert lavender.get_dataset(dataset.id).total_samples == ROWS  # only the iteration went


def test_shardsets_a_live_iteration_reads(dataset: Dataset, loops: Loops) -> None:
    main, feature = dataset.shardsets
    only_main = loops.start(dataset.id, "main-only", shardsets=[main.id])
    with pytest.raises(IterationBusy, match="shardset .* has a live iteration: main-only"):
        lavender.delete_shardset(dataset.id, main.id)
    # the feature shardset is not read by this iteration: it goes at once
    assert lavender.delete_shardset(dataset.id, feature.id).deleted == feature.id
    next(only_main)

    assert lavender.delete_shardset(dataset.id, main.id, force=True).deleted == main.id
    assert isinstance(loop_error(only_main), IterationNotFound)
    with pytest.raises(ShardsetNotFound):
        lavender.get_shardset(dataset.id, main.id)
    with pytest.raises(IterationNotFound):
        lavender.get_iteration("main-only")
    assert lavender.get_dataset(dataset.id).shardsets == []


def test_a_finished_iteration_does_not_hold_its_dataset(dataset: Dataset) -> None:
    for batch in Iteration.from_dataset(dataset.id, batch_size=500, iteration_id="over"):
        del batch
    lavender.delete_dataset(dataset.id)
    with pytest.raises(IterationNotFound):
        lavender.get_iteration("over")


def test_unknown_ids_are_not_found_with_or_without_force(client: LavenderClient) -> None:
    with pytest.raises(DatasetNotFound):
        lavender.delete_dataset("ds-nope", force=True)
    with pytest.raises(IterationNotFound):
        lavender.delete_iteration("nope", force=True)


@pytest.mark.slow
def test_the_server_stops_cleanly_after_a_forced_delete(
    launch: Launcher,  # noqa: F811
    reset_client: None,
    tmp_path: Path,
) -> None:
    loops = Loops()
    args = [*lavender_flight_command(), "--no-ui", "--port", "0", "--data-home",
            str(tmp_path / "home"), "--storage-root", str(tmp_path)]  # fmt: skip
    served = launch(args)
    lavender.init(served.wait_until_serving(), timeout=TIMEOUT)
    dataset = write("ds", tmp_path / "data")
    stream = loops.start(dataset.id, "live")
    lavender.delete_dataset(dataset.id, force=True)
    error = loop_error(stream)
    assert type(error) is IterationNotFound
    assert len(f"{type(error).__name__}: {error}".splitlines()) == 1
    loops.close()
    started = time.monotonic()
    code = served.stop(signal.SIGTERM)
    stderr = served.rest_of_stderr()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert time.monotonic() - started < 10


# -- the listings the dashboard pages through ----------------------------------------------


def finish(dataset_id: str, iteration_id: str) -> None:
    for batch in Iteration.from_dataset(dataset_id, batch_size=500, iteration_id=iteration_id):
        del batch


def test_list_iterations_filters_and_pages_on_the_server(
    dataset: Dataset, loops: Loops, data_dir: Path
) -> None:
    other = write("other", data_dir)
    finish(dataset.id, "a-done")
    loops.start(dataset.id, "b-running")
    finish(other.id, "c-other")
    finish(dataset.id, "d-done")
    loops.start(dataset.id, "e-running")

    def ids(**query: object) -> list[str]:
        return [p.id for p in lavender.list_iterations(**query)]  # type: ignore[arg-type]

    assert ids() == ["e-running", "d-done", "c-other", "b-running", "a-done"]  # as before
    assert ids(dataset_id=dataset.id) == ["e-running", "d-done", "b-running", "a-done"]
    assert ids(dataset_id=dataset.id, state="done") == ["d-done", "a-done"]
    assert ids(state="running") == ["e-running", "b-running"]
    assert ids(state="done", limit=2) == ["d-done", "c-other"]
    assert ids(state="done", offset=2, limit=2) == ["a-done"]
    assert ids(limit=2) == ["e-running", "d-done"]
    assert ids(offset=2, limit=2) == ["c-other", "b-running"]
    assert ids(offset=4) == ["a-done"]
    assert ids(offset=9, limit=5) == []
    assert [p.done for p in lavender.list_iterations(dataset.id, limit=2)] == [False, True]
    listed = lavender.list_iterations(dataset.id, limit=1, ranks=True)[0]
    assert (listed.id, listed.ranks[0].streams, listed.ranks[0].total) == ("e-running", 1, ROWS)
    with pytest.raises(Exception, match="state"):
        lavender.list_iterations(state="finished")


def test_list_nodes_shows_this_server(
    dataset: Dataset, loops: Loops, server: LavenderFlightServer, api_url: str
) -> None:
    (node,) = lavender.list_nodes()
    assert (node.id, node.location, node.alive) == (server.iterations.node, api_url, True)
    assert node.started_at <= node.heartbeat_at <= time.time() + 1
    loops.start(dataset.id, "live")
    deadline = time.monotonic() + TIMEOUT  # the janitor writes the count with its heartbeat
    while lavender.list_nodes()[0].streams != 1:
        assert time.monotonic() < deadline, "the node never counted its stream"
        time.sleep(0.2)
