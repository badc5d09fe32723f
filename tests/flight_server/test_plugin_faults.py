"""One bad plugin never stalls or kills the rest: crashes, hangs and broken plugins end to end.

A real server (``workers=2``: real spawned worker processes, or ``workers=0``: the plugins
in the server process) on a real catalog, driven by the client as a user would.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.pool import TransformPool
from lavender_flight.protocol.errors import InvalidArgument, TransformFailed
from lavender_flight.transforms import Plugins
from tests.client.test_transforms import TOTAL, make_dataset
from tests.flight_server.test_cli import (
    Served,
    clean_env,
    lavender_flight_command,
    run_quickly,
)

pytestmark = pytest.mark.slow

MODULE = '''
import os
import time

import pyarrow as pa
from lavender_flight.transforms import Filter, Preprocessor


def holds(batch, uid):
    return uid in batch.column("uid").to_pylist()


class Crash(Preprocessor, name="crash"):
    """os.abort() on the batch holding uid ``at``."""

    def process(self, batch, *, at: int = -1):
        if holds(batch, at):
            os.abort()
        return batch


class Hang(Preprocessor, name="hang"):
    """Sleeps ``seconds`` on the batch holding uid ``at``."""

    def process(self, batch, *, at: int = -1, seconds: float = 3600.0):
        if holds(batch, at):
            time.sleep(seconds)
        return batch


class Hopeless(Filter, name="hopeless"):
    def filter_batch(self, batch):
        raise KeyError("score")


class Stringy(Filter, name="stringy"):
    def filter_batch(self, batch):
        return pa.array(["yes"] * batch.num_rows)
'''
BATCH = 20
LOST = list(range(140, 160))  # the batch holding uid 150 (no shuffle): past the first ones


@pytest.fixture
def modules_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "faulty.py").write_text(MODULE)
    return folder


def serve(
    catalog: Catalog, modules_dir: Path, workers: int, timeout: float
) -> Iterator[LavenderFlightServer]:
    plugins = Plugins.load(modules_dir, timeout=timeout)
    server = LavenderFlightServer(
        LavenderService(catalog), "grpc://127.0.0.1:0", plugins, workers=workers
    )
    pool = server.iterations.pool
    if pool is not None:
        pool.min_row_seconds = 0.0  # cheap test plugins: use the workers anyway
        pool.timeout = timeout  # the engine builds its pool with the default limit
    lavender.init(f"grpc://127.0.0.1:{server.port}", timeout=60)
    try:
        yield server
    finally:
        lavender._client = None
        server.shutdown()


@pytest.fixture
def pooled(catalog: Catalog, modules_dir: Path) -> Iterator[LavenderFlightServer]:
    yield from serve(catalog, modules_dir, workers=2, timeout=1.0)


@pytest.fixture
def inline(catalog: Catalog, modules_dir: Path) -> Iterator[LavenderFlightServer]:
    yield from serve(catalog, modules_dir, workers=0, timeout=0.5)


def the_pool(server: LavenderFlightServer) -> TransformPool:
    assert server.iterations.pool is not None
    return server.iterations.pool


def delivered(iteration: Iteration) -> list[int]:
    return sorted(u for batch in iteration for u in batch["uid"])


def counts(iteration: Iteration) -> tuple[int, int, int, bool]:
    progress = lavender.get_iteration(iteration.id)
    return progress.completed, progress.failed, progress.filtered, progress.done


def test_a_worker_crash_fails_one_batch_and_the_server_goes_on(
    pooled: LavenderFlightServer, data_dir: Path
) -> None:
    dataset = make_dataset(data_dir)
    skipping = Iteration.from_dataset(
        dataset.id, batch_size=BATCH, preprocessors=[("crash", {"at": 150})], skip_on_failure=True
    )
    assert delivered(skipping) == [u for u in range(TOTAL) if u not in LOST]
    assert counts(skipping) == (TOTAL - BATCH, BATCH, 0, True)
    strict = Iteration.from_dataset(
        dataset.id, batch_size=BATCH, preprocessors=[("crash", {"at": 150})]
    )
    with pytest.raises(
        TransformFailed,
        match=r"^preprocessor 'crash': the preprocessing worker process died \(killed by signal "
        r"SIGABRT\) on a batch of 20 samples from uid=140; a new worker process takes its "
        r"place; skip_on_failure=True skips such batches$",
    ):
        list(strict)
    # before: the pool was broken for good; now a new iteration preprocesses as ever
    again = Iteration.from_dataset(dataset.id, batch_size=BATCH, preprocessors=["crash"])
    assert delivered(again) == list(range(TOTAL))
    assert the_pool(pooled).replaced == 2 and the_pool(pooled).answered > 0


def test_a_hung_plugin_in_a_worker_fails_its_batch_at_the_time_limit(
    pooled: LavenderFlightServer, data_dir: Path
) -> None:
    dataset = make_dataset(data_dir)
    started = time.monotonic()
    skipping = Iteration.from_dataset(
        dataset.id, batch_size=BATCH, preprocessors=[("hang", {"at": 150})], skip_on_failure=True
    )
    assert delivered(skipping) == [u for u in range(TOTAL) if u not in LOST]
    assert counts(skipping) == (TOTAL - BATCH, BATCH, 0, True)
    assert time.monotonic() - started < 15
    strict = Iteration.from_dataset(
        dataset.id, batch_size=BATCH, preprocessors=[("hang", {"at": 150})]
    )
    with pytest.raises(
        TransformFailed,
        match=r"^preprocessor 'hang' did not finish a batch of 20 samples from uid=140 within "
        r"the plugin time limit of 1 s \(--plugin-timeout\); its worker process was killed",
    ):
        list(strict)
    assert the_pool(pooled).replaced == 2


def test_a_hung_plugin_in_the_server_process_is_abandoned(
    inline: LavenderFlightServer, data_dir: Path
) -> None:
    dataset = make_dataset(data_dir)
    started = time.monotonic()
    skipping = Iteration.from_dataset(
        dataset.id,
        batch_size=BATCH,
        preprocessors=[("hang", {"at": 150, "seconds": 3.0})],
        skip_on_failure=True,
    )
    assert delivered(skipping) == [u for u in range(TOTAL) if u not in LOST]
    assert counts(skipping) == (TOTAL - BATCH, BATCH, 0, True)
    assert time.monotonic() - started < 3.0  # the stream did not wait for the sleeper
    strict = Iteration.from_dataset(
        dataset.id, batch_size=BATCH, preprocessors=[("hang", {"at": 150, "seconds": 3.0})]
    )
    with pytest.raises(
        TransformFailed,
        match=r"^preprocessor 'hang' did not finish a batch of 20 samples from uid=140 within "
        r"the plugin time limit of 0.5 s \(--plugin-timeout\); the call was abandoned",
    ):
        list(strict)


def test_skip_on_failure_with_a_filter_failing_everywhere(
    inline: LavenderFlightServer, data_dir: Path
) -> None:
    # before: the iteration ended in ServerError: PluginFailed
    dataset = make_dataset(data_dir)
    it = Iteration.from_dataset(
        dataset.id, batch_size=BATCH, filters=["hopeless"], skip_on_failure=True
    )
    assert delivered(it) == []
    assert counts(it) == (0, TOTAL, 0, True)


def test_a_filter_answering_strings_fails_clearly(
    inline: LavenderFlightServer, data_dir: Path
) -> None:
    # before: every row was kept ("yes" is truthy)
    dataset = make_dataset(data_dir)
    it = Iteration.from_dataset(
        dataset.id, batch_size=BATCH, filters=["stringy"], skip_on_failure=True
    )
    with pytest.raises(
        TransformFailed, match=r"^filter 'stringy': returned string values, not booleans"
    ):
        list(it)


def test_expression_errors_fail_at_creation(inline: LavenderFlightServer, data_dir: Path) -> None:
    dataset = make_dataset(data_dir)
    with pytest.raises(
        InvalidArgument,
        match=r"^filter 'expression': cannot parse filter expression 'label >=': invalid syntax",
    ):
        Iteration.from_dataset(
            dataset.id, batch_size=8, filters=[("expression", {"expr": "label >="})]
        )
    huge = " or ".join(f"uid == {u}" for u in range(6700))  # 20,100 terms
    with pytest.raises(InvalidArgument, match=rf"filter expression is {len(huge)} characters long"):
        Iteration.from_dataset(dataset.id, batch_size=8, filters=[("expression", {"expr": huge})])
    assert lavender.list_iterations(dataset.id) == []


def test_an_expression_naming_an_unknown_column_fails_at_creation(
    inline: LavenderFlightServer, data_dir: Path
) -> None:
    dataset = make_dataset(data_dir)
    with pytest.raises(
        InvalidArgument,
        match=r"^filter 'expression': expression 'score > 1' names unknown column 'score'; "
        r"columns: uid, text, label$",
    ):
        Iteration.from_dataset(
            dataset.id,
            batch_size=8,
            filters=[("expression", {"expr": "score > 1"})],
            skip_on_failure=True,
        )


# -- a crash on the very first batch: the server process must survive --------------------


@pytest.fixture
def served(tmp_path: Path, modules_dir: Path) -> Iterator[Served]:
    """``lavender-flight serve --workers 2`` in a process of its own (it may die)."""
    process = subprocess.Popen(
        [*lavender_flight_command(), "serve", "--no-ui", "--port", "0", "--demo",
         "--data-home", str(tmp_path / "home"), "--modules-dir", str(modules_dir),
         "--workers", "2", "--plugin-timeout", "5"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )  # fmt: skip
    server = Served(process)
    server.start_reading()
    try:
        server.wait_until_serving()
        lavender.init(server.url, timeout=60)
        yield server
    finally:
        lavender._client = None
        server.close()


def test_a_crash_on_the_first_batch_does_not_kill_the_server(served: Served) -> None:
    demo = lavender.get_dataset(name="demo")
    it = Iteration.from_dataset(
        demo.id, batch_size=BATCH, preprocessors=[("crash", {"at": 0})], skip_on_failure=True
    )
    assert delivered(it) == list(range(BATCH, demo.total_samples))
    assert lavender.get_iteration(it.id).failed == BATCH
    assert served.process.poll() is None, served.stderr  # still serving
    assert served.stop() == 0, served.rest_of_stderr()


def test_the_time_limit_is_a_server_flag() -> None:
    done = run_quickly([*lavender_flight_command(), "serve", "--plugin-timeout", "0"])
    assert done.returncode == 2
    assert done.stderr.startswith(
        "lavender-flight: error: --plugin-timeout 0: must be more than 0.0"
    )
