"""The preprocessing pool on its own: real spawned worker processes, real crashes and hangs.

One pool of two workers serves the module (each start costs a spawned interpreter); the
tests that break a worker check that it was replaced and that the others went on.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from lavender_flight.flight_server.pool import TransformPool
from lavender_flight.protocol.errors import TransformFailed
from lavender_flight.transforms.pipeline import pipeline_spec
from lavender_flight.transforms.worker import read_batch, write_batch

pytestmark = pytest.mark.slow

MODULE = '''
import os
import time

import pyarrow as pa
import pyarrow.compute as pc
from lavender_flight.transforms import Filter, Preprocessor


def holds(batch, uid):
    return uid in batch.column("uid").to_pylist()


class Crash(Preprocessor, name="crash"):
    """os.abort() on the batch holding uid ``at``; else adds the worker's pid."""

    def process(self, batch, *, at: int = -1):
        if holds(batch, at):
            os.abort()
        return batch.append_column("pid", pa.array([os.getpid()] * batch.num_rows))


class Exit(Preprocessor, name="exit"):
    def process(self, batch, *, at: int = -1, code: int = 3):
        if holds(batch, at):
            os._exit(code)
        return batch


class Hang(Preprocessor, name="hang"):
    def process(self, batch, *, at: int = -1):
        if holds(batch, at):
            time.sleep(3600)
        return batch


class SlowStart(Preprocessor, name="slow_start"):
    """Hangs when it is made (outside any plugin call the worker marks)."""

    def __init__(self):
        time.sleep(3600)

    def process(self, batch):
        return batch


class Slow(Preprocessor, name="slow"):
    def process(self, batch, *, seconds: float = 0.2):
        time.sleep(seconds)
        return batch


class Picky(Preprocessor, name="picky"):
    def process(self, batch):
        if holds(batch, 3):
            raise ValueError("cannot take uid 3")
        return batch


class CrashFilter(Filter, name="crash_filter"):
    def filter_batch(self, batch, *, at: int = -1):
        if holds(batch, at):
            os.abort()
        return pc.equal(pc.bit_wise_and(batch.column("uid"), 1), 0)
'''
TIMEOUT = 1.0
WAIT = 30.0  # every wait on a future is bounded: a hang fails the test instead of CI


@pytest.fixture(scope="module")
def modules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pool-modules")
    (folder / "faulty.py").write_text(MODULE)
    return folder


@pytest.fixture(scope="module")
def pool(modules_dir: Path) -> Iterator[TransformPool]:
    started = TransformPool(2, str(modules_dir), timeout=TIMEOUT)
    yield started
    started.close()


@pytest.fixture(scope="module")
def roomy_pool(modules_dir: Path) -> Iterator[TransformPool]:
    """A pool whose time limit a loaded machine never reaches (for tests of other faults:
    a replacement worker's start-up counts against the limit, and took over 1 s under load)."""
    started = TransformPool(2, str(modules_dir), timeout=WAIT)
    yield started
    started.close()


def spec(name: str, skip: bool = False, kind: str = "preprocessor", **params: Any) -> str:
    call = [(name, params)]
    if kind == "filter":
        return json.dumps(pipeline_spec(call, None, [], 0, skip, "uid"))
    return json.dumps(pipeline_spec([], None, call, 0, skip, "uid"))


def batch(number: int, rows: int = 4) -> pa.RecordBatch:
    uids = list(range(number * rows, number * rows + rows))
    return pa.record_batch({"uid": uids, "x": [u * 10 for u in uids]})


def uids(result: pa.RecordBatch) -> list[int]:
    return result.column("uid").to_pylist()


def workers_back(pool: TransformPool, count: int = 2) -> list[int]:
    deadline = time.monotonic() + WAIT
    while len(pool.pids()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pool.pids()) == count
    return pool.pids()


@pytest.mark.parametrize("skip", [False, True], ids=["strict", "skip_on_failure"])
def test_a_worker_that_aborts_is_replaced_and_only_its_batch_fails(
    roomy_pool: TransformPool, skip: bool
) -> None:
    pool = roomy_pool
    # before: ProcessPoolExecutor went BrokenProcessPool for good: every later batch failed
    pool.outcome(pool.submit(spec("crash"), batch(0)))  # started
    before_pids, before = workers_back(pool), pool.replaced
    futures = [pool.submit(spec("crash", skip, at=9), batch(k)) for k in range(6)]
    for k, future in enumerate(futures):
        if k != 2:
            assert uids(pool.outcome(future).result) == uids(batch(k))
        elif skip:
            lost = pool.outcome(future)
            assert lost.result is None and lost.failed.tolist() == [0, 1, 2, 3]
        else:
            with pytest.raises(
                TransformFailed,
                match=r"^preprocessor 'crash': the preprocessing worker process died \(killed "
                r"by signal SIGABRT\) on a batch of 4 samples from uid=8; a new worker process "
                r"takes its place; skip_on_failure=True skips such batches$",
            ):
                pool.outcome(future)
    assert pool.replaced == before + 1
    after = workers_back(pool)
    assert len(set(after) - set(before_pids)) == 1  # one new process, one old one kept
    # a new pipeline (a new iteration) runs on the new worker as on the old
    results = [pool.outcome(pool.submit(spec("crash", at=-2), batch(k))) for k in range(4)]
    assert {p for r in results for p in r.result.column("pid").to_pylist()} <= set(after)


def test_the_exit_code_of_a_worker_that_exits(pool: TransformPool) -> None:
    with pytest.raises(
        TransformFailed,
        match=r"^preprocessor 'exit': the preprocessing worker process died \(exit code 7\) on "
        r"a batch of 4 samples from uid=0",
    ):
        pool.outcome(pool.submit(spec("exit", at=0, code=7), batch(0)))
    assert uids(pool.outcome(pool.submit(spec("exit"), batch(1))).result) == uids(batch(1))


def test_a_hung_plugin_is_killed_at_the_time_limit(pool: TransformPool) -> None:
    workers_back(pool)
    before = pool.replaced
    started = time.monotonic()
    futures = [pool.submit(spec("hang", at=1), batch(k)) for k in range(4)]
    with pytest.raises(
        TransformFailed,
        match=r"^preprocessor 'hang' did not finish a batch of 4 samples from uid=0 within the "
        r"plugin time limit of 1 s \(--plugin-timeout\); its worker process was killed and a "
        r"new one takes its place; skip_on_failure=True skips such batches$",
    ):
        pool.outcome(futures[0])
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 5
    rest = [uids(pool.outcome(future).result) for future in futures[1:]]
    assert rest == [uids(batch(k)) for k in (1, 2, 3)]
    assert pool.replaced == before + 1


def test_the_time_limit_holds_outside_plugin_calls_too(pool: TransformPool) -> None:
    workers_back(pool)
    with pytest.raises(
        TransformFailed,
        match=r"^the preprocessing worker process \(between plugin calls\) did not finish a "
        r"batch of 4 samples from uid=0 within the plugin time limit of 1 s",
    ):
        pool.outcome(pool.submit(spec("slow_start"), batch(0)))
    assert uids(pool.outcome(pool.submit(spec("slow"), batch(1))).result) == uids(batch(1))


def test_hung_plugins_hold_no_thread(pool: TransformPool) -> None:
    # before: each hung plugin held a server thread forever (300 hung plugins: 319 threads)
    workers_back(pool)
    threads = threading.active_count()
    futures = [pool.submit(spec("hang", True, at=k * 4), batch(k)) for k in range(4)]
    for future in futures:
        lost = pool.outcome(future)
        assert lost.result is None and lost.failed.tolist() == [0, 1, 2, 3]
    assert threading.active_count() <= threads
    after = workers_back(pool)
    assert uids(pool.outcome(pool.submit(spec("hang"), batch(9))).result) == uids(batch(9))
    for pid in after:  # the killed ones are gone (reaped), only the live ones remain
        os.kill(pid, 0)


def test_timed_says_how_long_the_plugins_took_in_the_worker(pool: TransformPool) -> None:
    outcome, seconds = pool.timed(spec("slow", seconds=0.2), batch(0))
    assert uids(outcome.result) == [0, 1, 2, 3]
    assert 0.2 <= seconds < 0.9
    # a crash while timing is one failed batch, not a dead server
    with pytest.raises(TransformFailed, match=r"worker process died \(killed by signal SIGABRT"):
        pool.timed(spec("crash", at=0), batch(0))
    assert uids(pool.timed(spec("crash"), batch(1))[0].result) == [4, 5, 6, 7]


def test_policy_failures_come_back_as_the_pipeline_says(pool: TransformPool) -> None:
    with pytest.raises(
        TransformFailed,
        match=r"^preprocessor 'picky' failed on sample uid=3: ValueError: cannot take uid 3 "
        r"\(after 1 tries; skip_on_failure=True skips such samples\)$",
    ):
        pool.outcome(pool.submit(spec("picky"), batch(0)))
    skipped = pool.outcome(pool.submit(spec("picky", True), batch(0)))
    assert skipped.failed.tolist() == [3] and uids(skipped.result) == [0, 1, 2]


def test_filters_run_in_a_worker_too(pool: TransformPool) -> None:
    keep, failed = pool.masks(pool.submit_filter(spec("crash_filter", kind="filter"), batch(1)))
    assert keep.tolist() == [True, False, True, False] and not failed.any()
    keep, failed = pool.masks(
        pool.submit_filter(spec("crash_filter", True, kind="filter", at=5), batch(1))
    )
    assert not keep.any() and failed.all()


def test_a_slice_travels_as_its_rows_only(pool: TransformPool) -> None:
    big = pa.record_batch({"uid": np.arange(1_000_000), "x": np.arange(1_000_000) * 10})
    part = big.slice(400_000, 4)
    assert write_batch(part).size < 2_000  # pickle sends the 16 MB under a slice
    assert read_batch(write_batch(part)).equals(part)
    assert uids(pool.outcome(pool.submit(spec("picky"), part)).result) == uids(part)


def test_close_fails_what_is_pending_and_ends_the_workers(modules_dir: Path) -> None:
    pool = TransformPool(1, str(modules_dir), timeout=TIMEOUT)
    pool.outcome(pool.submit(spec("slow", seconds=0.0), batch(0)))
    (pid,) = pool.pids()
    futures = [pool.submit(spec("slow", seconds=0.5), batch(k)) for k in range(3)]
    time.sleep(0.2)
    pool.close()
    for future in futures:
        with pytest.raises(TransformFailed, match="the server is stopping"):
            pool.outcome(future)
    with pytest.raises(TransformFailed, match="the server is stopping"):
        pool.outcome(pool.submit(spec("slow"), batch(0)))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert pool.pids() == []


def test_a_worker_that_cannot_start_says_so(tmp_path: Path) -> None:
    pool = TransformPool(1, str(tmp_path / "gone"))
    try:
        future = pool.submit(spec("slow"), batch(0))
        future.exception(timeout=WAIT)
        with pytest.raises(
            TransformFailed,
            match=r"^a preprocessing worker process could not start \(exit code 1\); the "
            r"server log shows why$",
        ):
            pool.outcome(future)
    finally:
        pool.close()
