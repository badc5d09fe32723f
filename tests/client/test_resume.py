"""Resuming an iteration: after the client died, after the server was SIGKILLed, after a
pushback. Nothing acknowledged is delivered again, nothing is lost, and acks go in bulk.

Every dataset here has ``uid == position`` (shards written in order, uids counting up), so the
dataset positions the server reports in flight are uids too.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.protocol.iterations import IterationProgress
from tests.flight_server.test_cli import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    Served,
    clean_env,
    lavender_flight_command,
)

COLUMNS = [
    lavender.DatasetColumnOptions(name="uid", type_="int", description="id"),
    lavender.DatasetColumnOptions(name="text", type_="str"),
]
SEED = 20240611


def write_dataset(
    name: str,
    location: Path,
    shards: int,
    rows: int,
    text: Callable[[int], str] = lambda uid: f"sample {uid}",
) -> str:
    """A dataset of ``shards`` parquet shards of ``rows`` rows, uids 0.. in shard order."""
    dataset = lavender.create_dataset(name=name, uid_column_name="uid")
    shardset = lavender.create_shardset(dataset.id, location.as_uri(), COLUMNS)
    writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset.id)
    for index in range(shards):
        first = index * rows
        writer.write(
            [{"uid": u, "text": text(u)} for u in range(first, first + rows)],
            shard_index=index,
        )
    assert lavender.get_dataset(dataset.id).total_samples == shards * rows
    return dataset.id


def flat(batches: Sequence[Sequence[int]]) -> list[int]:
    return [u for batch in batches for u in batch]


def take(stream: Iterator[dict[str, Any]], count: int) -> list[list[int]]:
    """The uids of the next ``count`` batches of a running iteration."""
    return [list(next(stream)["uid"]) for _ in range(count)]


def uids_of(iteration: Iteration) -> list[list[int]]:
    """The uids of every batch the iteration delivers, batch by batch."""
    return [list(batch["uid"]) for batch in iteration]


def assert_no_repeats(uids: Sequence[int]) -> None:
    twice = sorted(u for u, n in Counter(uids).items() if n > 1)
    assert not twice, f"delivered more than once: {twice[:20]}"


def settled_progress(iteration_id: str, timeout: float = 10.0) -> IterationProgress:
    """Progress once it stops changing (a dead client's last ack or a stream winding down)."""
    deadline = time.monotonic() + timeout
    last = lavender.get_iteration(iteration_id)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = lavender.get_iteration(iteration_id)
        if (now.completed, now.current, now.inflight) == (
            last.completed,
            last.current,
            last.inflight,
        ):
            return now
        last = now
    pytest.fail(f"progress of {iteration_id} kept changing for {timeout}s: {last}")


def wait_for_completed(
    iteration_id: str, completed: int, timeout: float = 5.0
) -> IterationProgress:
    """Progress once ``completed`` samples are acknowledged (the background thread sent them)."""
    deadline = time.monotonic() + timeout
    while (progress := lavender.get_iteration(iteration_id)).completed < completed:
        if time.monotonic() > deadline:
            pytest.fail(f"only {progress.completed} of {completed} acknowledged after {timeout}s")
        time.sleep(0.05)
    return progress


# -- the client dies ---------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json
    import sys
    import time

    from lavender_flight.client import Iteration
    from lavender_flight.client import api as lavender

    url, dataset_id, iteration_id, batch_size, seed = sys.argv[1:6]
    pause_after, stuck_after = int(sys.argv[6]), int(sys.argv[7])
    lavender.init(url, timeout=10)
    iteration = Iteration.from_dataset(
        dataset_id,
        batch_size=int(batch_size),
        shuffle=True,
        shuffle_seed=int(seed),
        iteration_id=iteration_id,
    )
    for count, batch in enumerate(iteration, 1):
        print(json.dumps(batch["uid"]), flush=True)
        # a pause long enough for the acks thread to send what was completed so far, then a
        # slow trainer, then one stuck in a step until it is killed (so that batch is never
        # completed, however late the kill comes)
        if count == pause_after:
            time.sleep(1.0)
        elif count >= stuck_after:
            time.sleep(60.0)
        elif count > pause_after:
            time.sleep(0.3)
    print("END", flush=True)
    """
)


class Child:
    """A training process whose stdout lines are read by a thread, and that can be killed."""

    def __init__(self, script: Path, args: Sequence[str], log: Path) -> None:
        self.log = log
        self._stderr = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=clean_env(),
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def read_batches(self, count: int, timeout: float = START_TIMEOUT) -> list[list[int]]:
        """The uids of the next ``count`` batches the child printed."""
        deadline = time.monotonic() + timeout
        batches: list[list[int]] = []
        while len(batches) < count:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the child printed {len(batches)} of {count} batches in {timeout}s")
            if line is None or line == "END":
                self.process.wait(timeout=STOP_TIMEOUT)
                pytest.fail(
                    f"the child ended ({self.process.returncode}) after {len(batches)} of "
                    f"{count} batches:\n{self.log.read_text()}"
                )
            batches.append(json.loads(line))
        return batches

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """Child processes of a test; any still alive at teardown is killed."""
    started: list[Child] = []
    yield started
    for child in started:
        child.close()


@pytest.mark.slow
def test_resume_after_the_client_was_killed_mid_epoch(
    client: LavenderClient,
    api_url: str,
    data_dir: Path,
    tmp_path: Path,
    children: list[Child],
) -> None:
    total, batch_size, pause_after, seen = 2000, 50, 4, 8
    dataset_id = write_dataset("killed-client", data_dir / "main", shards=10, rows=200)
    script = tmp_path / "trainer.py"
    script.write_text(CHILD)
    iteration_id = "killed-client-run"
    args = [api_url, dataset_id, iteration_id, str(batch_size), str(SEED)]
    args += [str(pause_after), str(seen)]
    child = Child(script, args, tmp_path / "trainer.log")
    children.append(child)

    child_batches = child.read_batches(seen)
    child.kill()
    assert child.process.returncode == -signal.SIGKILL

    before = settled_progress(iteration_id)
    rank = before.ranks[0]
    assert before.total == total and not before.done
    assert before.completed > 0, "nothing the dead client consumed was acknowledged"
    # its connection closed: what it held (the batch it was stuck in, the read-ahead) went
    # back to the queue at once, and the loop's place moved back to what it completed
    assert rank.inflight == 0 and before.inflight[0] == [] and rank.read_ahead == 0
    assert before.current == before.completed and rank.streams == 0
    # acks follow consumption: the acknowledged samples are the child's first batches, whole;
    # every batch before the 1 s pause was sent, the one the child was stuck in was not
    acked_batches, rest = divmod(before.completed, batch_size)
    assert rest == 0
    assert pause_after - 1 <= acked_batches <= seen - 1
    acked = set(flat(child_batches[:acked_batches]))
    unacked_seen = flat(child_batches[acked_batches:])
    assert rank.pending >= len(unacked_seen), "the dead client's batches are not queued again"

    resumed = uids_of(Iteration.resume(iteration_id, rank=0))
    resumed_uids = flat(resumed)
    assert_no_repeats(resumed_uids)
    # nothing acknowledged is delivered again
    assert len(resumed_uids) == total - before.completed
    assert not acked & set(resumed_uids)
    # nothing is lost
    assert set(flat(child_batches)) | set(resumed_uids) == set(range(total))
    # only what the child held unacknowledged is delivered twice, and it comes first
    assert set(flat(child_batches)) & set(resumed_uids) == set(unacked_seen)
    assert resumed_uids[: len(unacked_seen)] == unacked_seen

    after = lavender.get_iteration(iteration_id)
    assert (after.completed, after.total, after.done) == (total, total, True)
    assert after.ranks[0].inflight == 0 and after.inflight[0] == [] and after.ranks[0].pending == 0


# -- the server dies ---------------------------------------------------------------------


@pytest.fixture
def servers() -> Iterator[list[Served]]:
    """Server processes of a test; any still running at teardown is stopped (or killed)."""
    started: list[Served] = []
    yield started
    for served in started:
        served.close()


NODE_TIMEOUT = 2.0
"""Seconds after which a server that stopped beating counts as dead (the tests' servers)."""


def serve(servers: list[Served], home: Path, port: int = 0) -> str:
    """Start ``lavender-flight serve`` on ``port`` (0: a free one) and a data home; its URL."""
    process = subprocess.Popen(
        [*lavender_flight_command(), "serve", "--no-ui", "--port", str(port),
         "--data-home", str(home), "--storage-root", str(home.parent),
         "--node-timeout", str(NODE_TIMEOUT)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )  # fmt: skip
    served = Served(process)
    servers.append(served)
    served.start_reading()
    return served.wait_until_serving()


@pytest.mark.slow
def test_resume_after_the_server_was_sigkilled_and_restarted(
    servers: list[Served],
    reset_client: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    total, batch_size = 5000, 64
    home = tmp_path / "home"
    lavender.init(serve(servers, home), timeout=10, reconnect_seconds=1)
    dataset_id = write_dataset("restart", tmp_path / "data", shards=10, rows=500)
    spec: dict[str, Any] = dict(
        batch_size=batch_size, shuffle=True, shuffle_seed=SEED, world_size=2
    )
    first = {
        rank: Iteration.from_dataset(dataset_id, rank=rank, iteration_id="restart-run", **spec)
        for rank in (0, 1)
    }
    # rank 0 reads 7 batches and stops its loop: closing completes (and sends) all 7
    stream0 = iter(first[0])
    consumed0 = take(stream0, 7)
    stream0.close()
    # rank 1 is in its 4th batch when the server dies: 3 are sent by the background thread
    stream1 = iter(first[1])
    consumed1 = take(stream1, 4)
    before = wait_for_completed("restart-run", (7 + 3) * batch_size)
    time.sleep(0.6)  # no more than those 3 are sent, however long we wait
    before = lavender.get_iteration("restart-run")
    assert [r.completed for r in before.ranks] == [7 * batch_size, 3 * batch_size]
    acked = flat(consumed0) + flat(consumed1[:3])

    servers[0].process.send_signal(signal.SIGKILL)
    assert servers[0].process.wait(timeout=STOP_TIMEOUT) == -signal.SIGKILL
    with caplog.at_level(logging.WARNING, logger="lavender_flight.client.acks"):
        stream1.close()  # the 4th batch's ack cannot reach the dead server: one warning
    assert re.search(r"64 completed sample\(s\) .* not recorded .* delivered again on resume",
                     caplog.text), caplog.text  # fmt: skip

    lavender.init(serve(servers, home), timeout=10)
    restarted = lavender.get_iteration("restart-run")
    assert (restarted.total, restarted.completed, restarted.done) == (total, len(acked), False)
    assert [r.completed for r in restarted.ranks] == [7 * batch_size, 3 * batch_size]
    # the dead server's streams are freed once its heartbeat lapses (a resume would not wait)
    deadline = time.monotonic() + NODE_TIMEOUT * 4
    while any(r.inflight or r.read_ahead for r in lavender.get_iteration("restart-run").ranks):
        assert time.monotonic() < deadline, "the dead server's streams still hold samples"
        time.sleep(0.2)

    resumed = {r: flat(uids_of(Iteration.resume("restart-run", rank=r))) for r in (0, 1)}
    for rank in (0, 1):
        assert_no_repeats(resumed[rank])
        rank_total = restarted.ranks[rank].total
        assert len(resumed[rank]) == rank_total - restarted.ranks[rank].completed
    everything = acked + resumed[0] + resumed[1]
    assert_no_repeats(everything)
    assert sorted(everything) == list(range(total))
    assert set(consumed1[3]) <= set(resumed[1]), "the unacknowledged batch was lost"

    done = lavender.get_iteration("restart-run")
    assert (done.completed, done.done) == (total, True)

    # the same seed gives the same order after the restart: a fresh iteration of the same
    # spec, minus what was acknowledged, is exactly what the resume delivered
    fresh = {
        r: flat(uids_of(Iteration.from_dataset(dataset_id, rank=r, iteration_id="fresh", **spec)))
        for r in (0, 1)
    }
    assert fresh[0][: 7 * batch_size] == flat(consumed0)
    assert fresh[1][: 4 * batch_size] == flat(consumed1)
    acked_set = set(acked)
    for rank in (0, 1):
        assert [u for u in fresh[rank] if u not in acked_set] == resumed[rank]


# -- pushback ----------------------------------------------------------------------------


def test_pushback_returns_held_batches_to_the_queue(client: LavenderClient, data_dir: Path) -> None:
    total, batch_size = 3000, 100
    dataset_id = write_dataset("pushback", data_dir / "main", shards=6, rows=500)
    iteration = Iteration.from_dataset(
        dataset_id, batch_size=batch_size, shuffle=True, shuffle_seed=SEED, iteration_id="held"
    )
    stream = iter(iteration)
    held = take(stream, 3)  # the loop is inside the 3rd batch: 2 are completed
    wait_for_completed("held", 2 * batch_size)
    before = settled_progress("held")
    assert before.completed == 2 * batch_size
    assert before.ranks[0].inflight >= batch_size
    assert set(held[2]) <= set(before.inflight[0])

    rank = before.ranks[0]
    assert rank.inflight == batch_size  # the batch the loop is in; the rest is read-ahead
    pushed = lavender.pushback("held")
    assert pushed == rank.inflight + rank.read_ahead
    after = lavender.get_iteration("held")
    assert after.ranks[0].inflight == 0 and after.inflight[0] == []
    # back in the queue (the open stream may already hold some of it again, ahead of its loop)
    assert after.ranks[0].pending + after.ranks[0].read_ahead == pushed
    assert after.completed == 2 * batch_size

    resumed = flat(uids_of(Iteration.resume("held", rank=0)))
    assert_no_repeats(resumed)
    assert len(resumed) == total - 2 * batch_size
    assert resumed[:batch_size] == held[2], "the held batch is not delivered again first"
    assert sorted(flat(held[:2]) + resumed) == list(range(total))
    final = lavender.get_iteration("held")
    assert (final.completed, final.done) == (total, True)

    stream.close()  # the old loop ends now: acknowledging its batch again changes nothing
    assert lavender.get_iteration("held").completed == total


# -- acks in bulk ------------------------------------------------------------------------


def test_acks_are_sent_in_bulk_not_per_batch(
    client: LavenderClient, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    total = 300
    dataset_id = write_dataset("tiny", data_dir / "main", shards=1, rows=total)
    sent: list[tuple[str, int]] = []
    action = LavenderClient.action

    def counting(self: LavenderClient, name: str, body: Any = None) -> bytes:
        # this iteration's only: a loop of an earlier test left suspended (not collected)
        # may still be retrying its reports to a server that is gone
        if name == "ack" and body.iteration_id == iteration.id:
            sent.append((threading.current_thread().name, sum(b - a for a, b in body.completed)))
        return action(self, name, body)

    iteration = Iteration.from_dataset(dataset_id, batch_size=1, shuffle=True, shuffle_seed=SEED)
    monkeypatch.setattr(LavenderClient, "action", counting)
    started = time.monotonic()
    batches = 0
    for batch in iteration:
        assert len(batch["uid"]) == 1
        batches += 1
        time.sleep(0.003)  # a trainer doing a little work per step
    elapsed = time.monotonic() - started

    assert batches == total
    assert 1 <= len(sent) <= total // 10, f"{len(sent)} ack calls for {total} batches"
    # completions every 0.25 s, and reports of what the loop took a few times a second (the
    # server keeps its read-ahead within about half a second of the loop's pace with them;
    # its window starts at 2 batches and doubles at each of the first reports)
    assert len(sent) <= elapsed * 12 + 10, f"{len(sent)} ack calls in {elapsed:.2f}s"
    assert sum(n for _, n in sent) == total, "a batch was acknowledged twice or never"
    assert any(name == "lavender-acks" for name, _ in sent), "no ack came from the thread"
    progress = lavender.get_iteration(iteration.id)
    assert (progress.completed, progress.done) == (total, True)
