"""Block pieces and ``take_rows``: a shuffled block's gather, checked against Arrow's take."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from lavender_flight.flight_server.engine import EpochPlan
from lavender_flight.flight_server.engine.blocks import (
    FIRST_PIECE_ROWS,
    PIECE_ROWS,
    BlockReader,
    take_rows,
)


def chunked(sizes: list[int], misaligned: bool = False) -> pa.Table:
    """A table of ``sum(sizes)`` rows in chunks of ``sizes`` (columns' chunks apart)."""
    start, tables = 0, []
    for size in sizes:
        uid = np.arange(start, start + size, dtype=np.int64)
        texts = pa.array([f"row {u}" for u in uid], type=pa.string())
        tables.append(pa.table({"uid": uid, "text": texts}))
        start += size
    table = pa.concat_tables(tables)
    if misaligned:  # the text column in other chunks than uid
        text = table.column("text").combine_chunks()
        half = len(text) // 3
        table = table.set_column(1, "text", pa.chunked_array([text[:half], text[half:]]))
    return table


@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("count", [0, 1, 7, 4096, 20_000])
def test_take_rows_is_arrows_take(count: int, misaligned: bool) -> None:
    table = chunked([5000, 1, 0, 9000, 6000], misaligned)
    rows = np.random.default_rng(count).permutation(table.num_rows)[:count]
    assert take_rows(table, rows).equals(table.take(pa.array(rows, type=pa.int64())))
    assert take_rows(table, rows).column("uid").to_pylist() == rows.tolist()


def test_take_rows_of_one_chunk_and_repeated_rows() -> None:
    table = chunked([300])
    rows = np.array([5, 5, 299, 0, 5], dtype=np.int64)
    assert take_rows(table, rows).column("uid").to_pylist() == [5, 5, 299, 0, 5]
    table = chunked([100, 200])
    assert take_rows(table, rows).column("uid").to_pylist() == [5, 5, 299, 0, 5]


def bounds(plan: EpochPlan, number: int) -> list[int]:
    return BlockReader._bounds(None, plan, number)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch", [1, 7, 1000, 1024, 50_000])
def test_a_block_starts_with_a_small_piece_at_a_batch_boundary(batch: int) -> None:
    plan = EpochPlan([100_000] * 6, batch, shuffle=True, seed=3, block_size=4)
    for number in range(len(plan.blocks)):
        block = plan.blocks[number]
        found = bounds(plan, number)
        assert found[0] == 0 and found[-1] == block.size
        assert all(a < b for a, b in itertools.pairwise(found))
        inner = [block.start + b for b in found[1:-1]]
        assert all(seq % batch == 0 for seq in inner), "a piece ends inside a batch"
        first = found[1] if len(found) > 2 else block.size
        assert first <= max(FIRST_PIECE_ROWS, batch) + batch  # a first batch waits for little
        step = -(-PIECE_ROWS // batch) * batch
        assert all(b - a <= step for a, b in itertools.pairwise(found[1:]))


def test_in_order_blocks_are_one_piece() -> None:
    plan = EpochPlan([100_000] * 3, 1024)
    assert bounds(plan, 0) == [0, 100_000]


IDLE_RELEASE_SCRIPT = """
import json, sys, time
import numpy as np, pyarrow as pa
from lavender_flight.flight_server.engine.blocks import IdleRelease
from lavender_flight.flight_server.memory import resident_bytes, system_allocator, tune_malloc

def rss():
    return resident_bytes() / (1 << 20)

assert tune_malloc() and system_allocator()  # as the server sets Arrow up
buffers = [pa.allocate_buffer(4 << 20) for _ in range(24)]  # a block's pieces, 96 MiB
for buffer in buffers:
    np.frombuffer(buffer, dtype=np.uint8)[:] = 1
del buffer, buffers
out = {"freed": rss()}
release = IdleRelease(delay=0.3)
release.later(keep=512 << 20)  # the last stream of an iteration ended
time.sleep(0.1)
release.block_started()  # the next epoch's first block, before the delay ran out
time.sleep(0.6)
out["next_epoch"] = rss()
release.later(keep=512 << 20)  # its streams ended too, and nothing starts
time.sleep(1.5)
out["idle"] = rss()
buffers = [pa.allocate_buffer(4 << 20) for _ in range(24)]
for buffer in buffers:
    np.frombuffer(buffer, dtype=np.uint8)[:] = 1
del buffer, buffers
out["freed_again"] = rss()
release.later(keep=32 << 20)  # more freed than may be kept: given back at once
out["over_keep"] = rss()
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc, /proc")
def test_freed_block_pages_stay_while_blocks_start_and_go_back_once_idle() -> None:
    # the next epoch's blocks reuse the pages the last one freed (no page faults: on a VM
    # each costs microseconds); once no block started for the delay, they go back, and
    # more than the bound of what may be kept goes back at once
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ARROW_"))}
    done = subprocess.run(
        [sys.executable, "-c", IDLE_RELEASE_SCRIPT],
        capture_output=True, text=True, timeout=120, env=env, check=True,
    )  # fmt: skip
    rss = json.loads(done.stdout)
    assert rss["next_epoch"] > rss["freed"] - 16, f"given back while blocks started: {rss}"
    assert rss["idle"] < rss["freed"] - 64, f"kept once idle: {rss}"
    assert rss["over_keep"] < rss["freed_again"] - 64, f"kept over the bound: {rss}"


MIMALLOC_RELEASE_SCRIPT = """
import json, threading, time
import lavender_flight.flight_server  # first: sets mimalloc up as a server does
import numpy as np, pyarrow as pa
from lavender_flight.flight_server.engine.blocks import block_pool, release_unused
from lavender_flight.flight_server.memory import resident_bytes, system_allocator, tune_malloc

def rss():
    return resident_bytes() / (1 << 20)

assert tune_malloc() and system_allocator()  # as the server sets Arrow up
if block_pool().backend_name != "mimalloc":
    print(json.dumps({"skip": block_pool().backend_name}))
    raise SystemExit

def on_a_thread(fn):
    box = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]

def gather():  # a block's largest buffers, on a read thread
    buffers = [pa.allocate_buffer(48 << 20, memory_pool=block_pool()) for _ in range(4)]
    for buffer in buffers:
        np.frombuffer(buffer, dtype=np.uint8)[:] = 1
    return buffers

pieces = on_a_thread(gather)
out = {"start": rss()}
pieces.clear()  # a stream let go of them, on another thread
out["freed"] = rss()
time.sleep(1.5)  # longer than mimalloc's own purge delay as pyarrow builds it (1 s)
pa.allocate_buffer(1 << 20, memory_pool=block_pool())  # mimalloc purges on its next call
out["after_a_while"] = rss()
release_unused()  # IdleRelease's release, on a third thread
out["released"] = rss()
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc, /proc")
def test_mimalloc_keeps_freed_block_pages_until_a_release_gives_every_threads_back() -> None:
    # pyarrow's pool.release_unused() releases the default pool, not the one it is called
    # on; mimalloc's own purge (after 1 s, as pyarrow builds it) made the next block fault
    mine = ("MALLOC_", "ARROW_", "MIMALLOC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(mine)}
    done = subprocess.run(
        [sys.executable, "-c", MIMALLOC_RELEASE_SCRIPT],
        capture_output=True, text=True, timeout=120, env=env, check=True,
    )  # fmt: skip
    rss = json.loads(done.stdout)
    if "skip" in rss:
        pytest.skip(f"the block pool is {rss['skip']}, not mimalloc")
    assert rss["freed"] > rss["start"] - 16, f"given back when freed: {rss}"
    assert rss["after_a_while"] > rss["freed"] - 16, f"mimalloc purged them itself: {rss}"
    assert rss["released"] < rss["freed"] - 128, f"kept after a release: {rss}"
