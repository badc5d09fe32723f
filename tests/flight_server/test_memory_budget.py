"""The server's one memory budget (``--memory-mb``): decoded shards kept in one LRU for every
iteration and epoch, an iteration whose block cannot fit refused at creation, and a server's
resident memory that stays under the budget whatever the number of iterations."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.memory import (
    MemoryBudget,
    heap_in_use_bytes,
    release_pool,
    resident_bytes,
)
from lavender_flight.flight_server.shard_io import ShardIO
from lavender_flight.flight_server.storage import Location
from lavender_flight.protocol.errors import InvalidArgument
from tests.client.test_resume import write_dataset as write_resume_dataset
from tests.conftest import CALL_TIMEOUT
from tests.flight_server.test_cli import (  # noqa: F401  (launch is a fixture)
    Launcher,
    launch,
    lavender_flight_command,
)
from tests.flight_server.test_faults import SERVING
from tests.flight_server.test_load import rss_kib

TEXT = "x" * 100  # the benchmarks' rows: a uid and 100 characters of text


class CountingShardIO(ShardIO):
    """Shard I/O that counts the shard files it reads (decodes), by file name."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self._lock = threading.Lock()

    def read(self, where: Location, path: str, *args: Any, **kwargs: Any) -> pa.Table:
        with self._lock:
            self.reads[path.rsplit("/", 1)[-1]] += 1
        return super().read(where, path, *args, **kwargs)


def write_dataset(name: str, folder: Path, shards: int, rows: int) -> str:
    """A dataset of ``shards`` Parquet shards of ``rows`` rows of a uid and 100 characters."""
    return write_resume_dataset(name, folder, shards, rows, text=lambda u: f"{u:08d}{TEXT}")


@pytest.fixture
def served_with(catalog: Catalog, reset_client: None) -> Iterator[Callable[..., LavenderService]]:
    """Start a server in this process over a service made with the given options."""
    servers: list[LavenderFlightServer] = []

    def start(**options: Any) -> LavenderService:
        service = LavenderService(catalog, allow_memory=True, **options)
        server = LavenderFlightServer(service, "grpc://127.0.0.1:0")
        servers.append(server)
        lavender.init(f"grpc://127.0.0.1:{server.port}", timeout=CALL_TIMEOUT)
        return service

    yield start
    for server in servers:
        server.shutdown()


def uids(iteration: Iteration) -> list[int]:
    return [u for batch in iteration for u in batch["uid"]]


def test_the_second_epoch_of_a_dataset_that_fits_reads_no_shard_file(
    served_with: Callable[..., LavenderService], data_dir: Path
) -> None:
    shard_io = CountingShardIO()
    served_with(shard_io=shard_io, memory=MemoryBudget(256 << 20))
    dataset_id = write_dataset("fits", data_dir, shards=6, rows=500)
    shard_io.reads.clear()  # what registration and writing read is not the iteration's
    iteration = Iteration.from_dataset(
        dataset_id, batch_size=100, shuffle=True, shuffle_seed=3, shuffle_block_size=2, epochs=2
    )
    first = uids(iteration)
    assert sorted(first) == list(range(3000))
    assert sorted(shard_io.reads) == [f"shard.{i:08d}.parquet" for i in range(6)]
    assert set(shard_io.reads.values()) == {1}, shard_io.reads  # each decoded once
    shard_io.reads.clear()
    second = uids(iteration)
    assert sorted(second) == list(range(3000)) and second != first
    assert not shard_io.reads, f"the second epoch read shard files: {dict(shard_io.reads)}"
    # another iteration over the same dataset is served from the same memory
    again = Iteration.from_dataset(dataset_id, batch_size=100)
    assert uids(again) == list(range(3000))
    assert not shard_io.reads, f"a new iteration read shard files: {dict(shard_io.reads)}"


def test_a_budget_too_small_for_one_block_is_one_clear_error_at_from_dataset(
    served_with: Callable[..., LavenderService], data_dir: Path
) -> None:
    service = served_with(memory=MemoryBudget(1 << 20))  # 1 MiB; a shard decodes to ~1.2 MiB
    dataset_id = write_dataset("too-big", data_dir, shards=4, rows=10_000)
    with pytest.raises(InvalidArgument) as shuffled:
        Iteration.from_dataset(dataset_id, batch_size=256, shuffle=True, shuffle_block_size=4)
    message = str(shuffled.value)
    assert "\n" not in message
    assert "a block of this iteration (4 shards, about" in message
    assert "does not fit the server's memory budget of 1 MiB" in message
    assert "a smaller shuffle_block_size, or a server started with a larger --memory-mb" in message
    with pytest.raises(InvalidArgument, match=r"\(one shard, about .* larger --memory-mb"):
        Iteration.from_dataset(dataset_id, batch_size=256)
    assert not lavender.list_iterations(dataset_id), "a refused iteration was created"
    assert service.memory.max_bytes == 1 << 20


def run_iterations(dataset_id: str, count: int, pid: int) -> list[int]:
    """Create and read ``count`` iterations of several kinds; the server's RSS (KiB) after each."""
    kinds: Sequence[dict[str, Any]] = [
        {},
        {"shuffle": True, "shuffle_block_size": 4},
        {"filters": [{"name": "expression", "params": {"expr": "uid % 2 == 0"}}]},
        {"shuffle": True, "shuffle_block_size": 2, "epochs": 2},
    ]
    after = []
    for index in range(count):
        options = kinds[index % len(kinds)]
        iteration = Iteration.from_dataset(
            dataset_id, batch_size=1024, shuffle_seed=index, format="arrow", **options
        )
        rows = sum(batch.num_rows for batch in iteration)
        assert rows == (20_000 if "filters" in options else 40_000), (index, options)
        after.append(rss_kib(pid))
    return after


@pytest.mark.slow
def test_a_hundred_iterations_leave_the_server_under_its_memory_budget(
    launch: Launcher,  # noqa: F811
    reset_client: None,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    budget_mb = 64
    served = launch(
        [*lavender_flight_command(), "serve", "--no-ui", "--port", "0", "--workers", "0",
         "--memory-mb", str(budget_mb), "--data-home", str(tmp_path / "home"),
         "--storage-root", str(tmp_path)]
    )  # fmt: skip
    lavender.init(served.wait_for(SERVING).group(1), timeout=CALL_TIMEOUT)
    # 8 shards x 5,000 rows, ~4.5 MiB decoded: the whole dataset fits the budget
    dataset_id = write_dataset("many", tmp_path / "data", shards=8, rows=5_000)
    pid = served.process.pid
    started = time.monotonic()
    after = run_iterations(dataset_id, 100, pid)
    record_property("seconds", round(time.monotonic() - started, 1))
    record_property("rss_mib", [kib >> 10 for kib in after[::10]])
    assert len(lavender.list_iterations(dataset_id)) == 100
    # fixed overhead: Python, pyarrow, gRPC and the catalog, ~150-250 MiB on this machine
    limit = (budget_mb + 300) << 10
    assert max(after) <= limit, f"RSS {max(after) >> 10} MiB over {limit >> 10} MiB"
    growth = after[-1] - after[9]
    assert growth <= 32 << 10, (
        f"RSS grew {growth >> 10} MiB from the 10th iteration to the 100th: "
        f"{[kib >> 10 for kib in after[::10]]}"
    )


def test_a_block_never_waits_for_the_read_ahead_of_its_own_stream() -> None:
    budget = MemoryBudget(8 << 20, wait_seconds=20)
    ahead = budget.reserve(8 << 20, wait=False)  # a stream's read-ahead: held all its life
    started = time.monotonic()
    block = budget.reserve(6 << 20)  # the block that stream reads next
    assert time.monotonic() - started < 1.0, "the block waited for its stream's read-ahead"
    assert budget.reserved_bytes == 14 << 20
    # blocks do wait for blocks: a second one waits until the first is dropped
    threading.Timer(0.3, block.release).start()
    started = time.monotonic()
    with budget.reserve(6 << 20):
        waited = time.monotonic() - started
    assert 0.2 < waited < 5.0, waited
    ahead.release()
    assert budget.reserved_bytes == 0


@pytest.mark.parametrize(
    ("env", "backend"), [({}, "system"), ({"ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}, "mimalloc")]
)
def test_the_server_runs_arrow_on_glibc_malloc_unless_told_otherwise(
    env: dict[str, str], backend: str
) -> None:
    script = (
        "import pyarrow as pa\n"
        "from lavender_flight.flight_server.memory import system_allocator, tune_malloc\n"
        "tuned, switched = tune_malloc(), system_allocator()\n"
        "print(tuned, switched, pa.default_memory_pool().backend_name)\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ARROW_"))}
    found = subprocess.run(
        [sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    tuned, switched, name = found.stdout.split()
    assert tuned == "True" and name == backend
    assert switched == str(not env)


@pytest.mark.skipif(heap_in_use_bytes() is None, reason="not glibc 2.33 or later")
def test_heap_in_use_bytes_counts_what_malloc_handed_out() -> None:
    before = heap_in_use_bytes()
    # 64 KiB each: under glibc's mmap threshold, from the heap
    chunks = [ctypes.create_string_buffer(64 << 10) for _ in range(256)]
    held = heap_in_use_bytes()
    big = ctypes.create_string_buffer(64 << 20)  # over it: a mapping of its own
    mapped = heap_in_use_bytes()
    del chunks, big
    after = heap_in_use_bytes()
    assert before is not None and held is not None and mapped is not None
    assert after is not None
    assert held >= before + (15 << 20), (before, held)
    assert mapped >= held + (63 << 20), (held, mapped)
    assert after <= mapped - (78 << 20), (mapped, after)
    rss = resident_bytes()
    assert rss is not None and rss > 16 << 20


def test_release_pool_releases_the_pool_it_is_given() -> None:
    # pyarrow's MemoryPool.release_unused releases the default pool, whichever it is
    # called on: release_pool does the pool's own (mimalloc: its collect), or says it cannot
    assert release_pool(pa.default_memory_pool())
    try:
        mimalloc = pa.mimalloc_memory_pool()
    except (NotImplementedError, pa.ArrowException):
        mimalloc = None
    default = pa.default_memory_pool().backend_name
    if mimalloc is not None and mimalloc.backend_name != default:
        assert release_pool(mimalloc), "libarrow's arrow_mi_collect was not found"
    try:
        jemalloc = pa.jemalloc_memory_pool()
    except (NotImplementedError, pa.ArrowException):
        return
    if jemalloc.backend_name != default:
        assert not release_pool(jemalloc)
