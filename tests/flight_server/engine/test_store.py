"""The engine without Flight: ``ProgressStore`` on a real catalog file, two servers sharing it,
and a ``LiveIteration`` driven directly through the manager."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.flight_server import LavenderService
from lavender_flight.flight_server.engine import (
    IterationManager,
    LiveIteration,
    ProgressStore,
    World,
    blocks,
)
from lavender_flight.flight_server.engine.blocks import Abandoned, _Block
from lavender_flight.flight_server.engine.manager import WARM_SECONDS
from lavender_flight.flight_server.engine.plan import ORDER_VERSION, BlockOrder
from lavender_flight.flight_server.engine.plans import Plans
from lavender_flight.flight_server.engine.work import Stopped
from lavender_flight.flight_server.memory import MemoryBudget
from lavender_flight.flight_server.read_pool import CPU, LOCAL
from lavender_flight.protocol import ColumnOptions
from lavender_flight.protocol.errors import InvalidArgument
from lavender_flight.protocol.iterations import (
    AckBody,
    IterationCommand,
    IterationPlan,
    IterationRecord,
    IterationSpec,
    IterationTicket,
)

SIZE, BATCH = 40, 4


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    found = Catalog(tmp_path / "catalog.db")
    yield found
    found.close()


@pytest.fixture
def iteration_id(catalog: Catalog) -> str:
    dataset = catalog.create_dataset("d", "uid")
    record = IterationRecord(
        id="it-1",
        dataset_id=dataset.id,
        spec=IterationSpec(dataset_id=dataset.id, batch_size=BATCH),
        plan=IterationPlan(shards=[(0, SIZE)], seed=0),
        total=SIZE,
        created_at=0.0,
    )
    catalog.create_iteration(record)
    return record.id


def sizes(rank: int) -> int:
    return SIZE


def test_two_servers_on_one_catalog_never_hand_out_a_sample_twice(
    catalog: Catalog, iteration_id: str, tmp_path: Path
) -> None:
    other_catalog = Catalog(tmp_path / "catalog.db")  # another server process's view
    a, b = ProgressStore(catalog, "nd-a"), ProgressStore(other_catalog, "nd-b")
    mine = a.open_stream(iteration_id, 0, 0, (0, 2), sizes, BATCH)
    theirs = b.open_stream(iteration_id, 0, 0, (1, 2), sizes, BATCH)
    seen: list[tuple[int, int]] = []
    for store, handle, worker in ((a, mine, 0), (b, theirs, 1)) * 10:
        claim = store.claim(handle, World(worker=worker, num_workers=2), 1)
        assert claim is not None
        seen.extend(r for unit in claim.units for r in unit)
    covered = sorted(s for start, stop in seen for s in range(start, stop))
    assert covered == list(range(SIZE))  # each once, both servers together
    state = a.state(iteration_id, 0, 0)
    assert state is not None and sorted(state.nodes) == ["nd-a", "nd-b"]
    other_catalog.close()


def test_a_dead_servers_streams_are_freed_by_a_live_one(
    catalog: Catalog, iteration_id: str
) -> None:
    dying, alive = ProgressStore(catalog, "nd-dying"), ProgressStore(catalog, "nd-alive")
    handle = dying.open_stream(iteration_id, 0, 0, (0, 1), sizes, BATCH)
    dying.claim(handle, World(), 3)
    assert alive.expire() == 0  # its lease is good and its node is not known dead
    assert alive.expire(dead_nodes=["nd-dying"]) == 3 * BATCH
    state = alive.state(iteration_id, 0, 0)
    assert state is not None and state.streams == {} and state.pending_count == 3 * BATCH
    assert dying.claim(handle, World(), 1) is None  # the zombie stream learns it is over


def test_acks_complete_once_and_refuse_what_was_never_sent(
    catalog: Catalog, iteration_id: str
) -> None:
    store = ProgressStore(catalog, "nd-a")
    handle = store.open_stream(iteration_id, 0, 0, (0, 1), sizes, BATCH)
    store.claim(handle, World(), 2)
    added, _ = store.ack(iteration_id, 0, 0, [(0, 8)], [(0, 4)])
    assert added == 4
    again, state = store.ack(iteration_id, 0, 0, [], [(0, 4)])  # a retried ack
    assert again == 0 and state.completed == 4 and state.current == 8
    with pytest.raises(InvalidArgument, match="never sent"):
        store.ack(iteration_id, 0, 0, [], [(8, 12)])


def write_dataset(service: LavenderService, folder: Path) -> str:
    dataset = service.create_dataset("engine", "uid")
    shardset = service.create_shardset(
        dataset.id,
        folder.as_uri(),
        [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="text", type_="str")],
    )
    for index in range(3):
        uids = list(range(index * 30, (index + 1) * 30))
        table = pa.table({"uid": uids, "text": [f"t{u}" for u in uids]})
        service.write_shard(dataset.id, shardset.id, index, table)
    return dataset.id


def test_a_live_iteration_streams_and_acks_without_flight(catalog: Catalog, tmp_path: Path) -> None:
    service = LavenderService(catalog)
    dataset_id = write_dataset(service, tmp_path / "data")
    manager = IterationManager(catalog, service)
    try:
        spec = IterationSpec(dataset_id=dataset_id, batch_size=8, shuffle=True, shuffle_seed=3)
        live = manager.open(IterationCommand(iteration_id="direct", spec=spec))
        schema, messages = live.stream(IterationTicket(iteration_id="direct", window=False))
        assert schema.names == ["uid", "text"]
        uids: list[int] = []
        for batch, metadata in messages:
            uids.extend(batch.column("uid").to_pylist())
            spans = [
                r for _, ranges in json.loads(metadata.to_pybytes())["batches"] for r in ranges
            ]
            live.ack(AckBody(iteration_id="direct", taken=spans, completed=spans))
        assert sorted(uids) == list(range(90)) and uids != sorted(uids)
        progress = manager.progress("direct")
        assert (progress.completed, progress.done, progress.read_ahead) == (90, True, 0)
    finally:
        manager.close()


@pytest.fixture
def engine(catalog: Catalog, tmp_path: Path) -> Iterator[tuple[LavenderService, IterationManager]]:
    """A service over the engine's dataset and a manager of it (closed after)."""
    service = LavenderService(catalog)
    write_dataset(service, tmp_path / "data")
    manager = IterationManager(catalog, service)
    yield service, manager
    manager.close()


def shuffled(service: LavenderService) -> IterationSpec:
    """A shuffled spec of the engine's dataset, batches of 8."""
    (dataset,) = service.catalog.list_datasets()
    return IterationSpec(dataset_id=dataset.id, batch_size=8, shuffle=True, shuffle_seed=3)


def opened(engine: tuple[LavenderService, IterationManager], iteration_id: str) -> LiveIteration:
    """A new shuffled iteration (``shuffled``) of the engine's dataset, opened by its manager."""
    service, manager = engine
    return manager.open(IterationCommand(iteration_id=iteration_id, spec=shuffled(service)))


def test_a_new_iteration_reads_its_first_block_before_any_stream(
    engine: tuple[LavenderService, IterationManager],
) -> None:
    service, manager = engine
    live = opened(engine, "warm")
    block = live.blocks._cache[(0, 0)]  # read as it was created: no stream yet
    first = block.pieces[0].result(timeout=30)
    assert first.table.num_rows > 0 and not live.open_streams
    assert service.memory.reserved_bytes > 0  # the block is held for the stream to come
    # nobody came for WARM_SECONDS: the janitor lets the block go
    live.last_used -= WARM_SECONDS + 1
    manager._evict_idle()
    assert not live.blocks._cache and service.memory.reserved_bytes == 0
    assert manager.get("warm") is live  # the iteration itself stays
    # and its stream reads the same rows as an iteration that was not warmed
    _, messages = live.stream(IterationTicket(iteration_id="warm", window=False))
    uids = [u for batch, _ in messages for u in batch.column("uid").to_pylist()]
    other = opened(engine, "cold")
    for future in other.blocks._cache[(0, 0)].pieces:
        future.result(timeout=30)
    other.blocks.clear()  # read when its stream asks, as before warming
    _, again = other.stream(IterationTicket(iteration_id="cold", window=False))
    assert uids == [u for batch, _ in again for u in batch.column("uid").to_pylist()]
    assert sorted(uids) == list(range(90)) and uids != sorted(uids)


def test_a_block_cleared_under_a_stream_is_read_again_and_its_gather_stops(
    engine: tuple[LavenderService, IterationManager],
) -> None:
    service, _ = engine
    live = opened(engine, "cleared")
    plan = live.views.plan(0)
    state = live.blocks._cache[(0, 0)]
    seq = np.arange(plan.blocks[0].start, plan.blocks[0].start + 16)
    expected = live.blocks.rows(plan, seq).table.column("uid").to_pylist()
    # the last stream ended as this one began: clear() abandoned the block it waits on
    stale = _Block(state.number, state.start, state.bounds, [Future() for _ in state.pieces])
    for future in stale.pieces:
        future.set_exception(Abandoned("cleared"))
    live.blocks._cache[(0, 0)] = stale
    assert live.blocks.rows(plan, seq).table.column("uid").to_pylist() == expected
    assert live.blocks._cache[(0, 0)] is not stale  # read afresh
    # an abandoned block's gather computes no piece
    fresh = _Block(state.number, state.start, state.bounds, [Future() for _ in state.pieces])
    fresh.abandoned = True
    reads = [live.blocks.pool.submit(CPU, live.blocks._read_shard, slot)
             for slot in plan.blocks[0].shard_slots]  # fmt: skip
    order: Future[BlockOrder | None] = Future()
    order.set_result(plan.draw_order(0))
    live.blocks._gather(plan, fresh, reads, order)
    for future in fresh.pieces:
        with pytest.raises(Abandoned):
            future.result(timeout=10)
    live.blocks.clear()
    deadline = time.monotonic() + 30  # the next block's read, begun by rows(): let it end
    while service.read_pool.busy and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_shuffled_block_is_laid_end_to_end_in_the_block_pool(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a block's columns are one buffer each once its shards are laid end to end (tens of
    # MB on real data), and so are its gathered pieces of large values: those over glibc's
    # mmap threshold come from the block pool (mimalloc's, which keeps freed pages for the
    # next block), not from glibc, which maps and faults in each anew. A counting pool
    # stands in for it here.
    counting = pa.proxy_memory_pool(pa.system_memory_pool())
    monkeypatch.setattr(blocks, "block_pool", lambda: counting)
    monkeypatch.setattr(blocks, "LARGE_BUFFER_BYTES", 0)  # these columns count as large
    service = LavenderService(catalog)
    dataset = service.create_dataset("pool", "uid")
    shardset = service.create_shardset(
        dataset.id,
        (tmp_path / "data").as_uri(),
        [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="text", type_="str")],
    )
    rows = 3000  # two shards: more than the first piece, so the block is laid end to end
    for index in range(2):
        uids = list(range(index * rows, (index + 1) * rows))
        table = pa.table({"uid": uids, "text": [f"text of {u}" for u in uids]})
        service.write_shard(dataset.id, shardset.id, index, table)
    manager = IterationManager(catalog, service)
    try:
        spec = IterationSpec(dataset_id=dataset.id, batch_size=100, shuffle=True, shuffle_seed=5)
        live = manager.open(IterationCommand(iteration_id="pooled", spec=spec))
        pieces = live.blocks._cache[(0, 0)].pieces
        assert len(pieces) > 1
        held = [future.result(timeout=30) for future in pieces]
        # the block's two columns were laid end to end there (6000 int64 uids and their
        # texts; freed once every piece was gathered from them)
        assert counting.max_memory() >= 2 * rows * 8 + 2 * rows * len("text of 0")
        _, messages = live.stream(IterationTicket(iteration_id="pooled", window=False))
        uids = [u for batch, _ in messages for u in batch.column("uid").to_pylist()]
        assert sorted(uids) == list(range(2 * rows)) and uids != sorted(uids)
        del held, pieces
        live.blocks.clear()
    finally:
        manager.close()


def _shuffled_blocks(
    catalog: Catalog, tmp_path: Path, budget: MemoryBudget | None, name: str
) -> tuple[IterationManager, LiveIteration]:
    """An iteration over 5 one-shard blocks of 400 rows, on a service with ``budget``."""
    service = LavenderService(catalog, memory=budget) if budget else LavenderService(catalog)
    dataset = service.create_dataset(name, "uid")
    shardset = service.create_shardset(
        dataset.id,
        (tmp_path / name).as_uri(),
        [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="text", type_="str")],
    )
    for index in range(5):
        uids = list(range(index * 400, (index + 1) * 400))
        table = pa.table({"uid": uids, "text": [f"text of {u}" for u in uids]})
        service.write_shard(dataset.id, shardset.id, index, table)
    manager = IterationManager(catalog, service)
    spec = IterationSpec(
        dataset_id=dataset.id, batch_size=100, shuffle=True, shuffle_seed=3, shuffle_block_size=1
    )
    return manager, manager.open(IterationCommand(iteration_id=name, spec=spec))


def test_a_stream_reads_two_blocks_ahead_when_the_budget_has_room(
    catalog: Catalog, tmp_path: Path
) -> None:
    # a shuffled block takes longer to gather than to stream: a stream in block 0 has
    # blocks 1 and 2 gathered beside it, and never more than the reader keeps
    manager, live = _shuffled_blocks(catalog, tmp_path, None, "ahead")
    try:
        plan = live.views.plan(0)
        for future in live.blocks._cache[(0, 0)].pieces:
            future.result(timeout=30)  # held: the block has its reservation
        live.blocks.rows(plan, np.arange(0, 100, dtype=np.int64))
        assert sorted(live.blocks._cache) == [(0, 0), (0, 1), (0, 2)]
        for future in live.blocks._cache[(0, 2)].pieces:
            future.result(timeout=30)
        live.blocks.rows(plan, np.arange(800, 900, dtype=np.int64))  # into block 2
        kept = set(live.blocks._cache)
        assert {(0, 2), (0, 3), (0, 4)} <= kept and len(kept) <= 4
        _, messages = live.stream(IterationTicket(iteration_id="ahead", window=False))
        uids = [u for batch, _ in messages for u in batch.column("uid").to_pylist()]
        assert sorted(uids) == list(range(2000)) and uids != sorted(uids)
        live.blocks.clear()
    finally:
        manager.close()


def test_a_tight_budget_reads_only_the_next_block_ahead(catalog: Catalog, tmp_path: Path) -> None:
    # the block after the next is started only while what is reserved leaves half the
    # budget free: here one block's reservation already takes more than that
    manager, live = _shuffled_blocks(catalog, tmp_path, MemoryBudget(18_000), "tight")
    try:
        plan = live.views.plan(0)
        for future in live.blocks._cache[(0, 0)].pieces:
            future.result(timeout=30)
        reservation = live.blocks._cache[(0, 0)].reservation
        assert reservation is not None and reservation.nbytes > 9_000
        live.blocks.rows(plan, np.arange(0, 100, dtype=np.int64))
        assert sorted(live.blocks._cache) == [(0, 0), (0, 1)]
        live.blocks.clear()
    finally:
        manager.close()


def test_only_buffers_over_the_mmap_threshold_come_from_the_block_pool() -> None:
    # smaller ones stay on glibc's heap, which reuses them and gives them back when idle
    small = blocks.pool_for(blocks.LARGE_BUFFER_BYTES)
    assert small is not blocks.block_pool()
    assert small.backend_name == pa.default_memory_pool().backend_name
    assert blocks.pool_for(blocks.LARGE_BUFFER_BYTES + 1) is blocks.block_pool()
    table = pa.table({"uid": np.arange(1000), "text": ["x" * 100] * 1000})
    assert blocks.largest_column_bytes(table) == table.column("text").nbytes
    assert blocks.largest_column_bytes(table, 250) == table.column("text").nbytes // 4
    assert blocks.largest_column_bytes(table.slice(0, 0), 10) == 0


def test_a_shuffled_block_reads_ahead_once_its_rows_are_here_and_abandoned_reads_stop(
    engine: tuple[LavenderService, IterationManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    service, manager = engine
    spec = shuffled(service).model_copy(update={"shuffle_block_size": 1})  # 3 blocks
    live = manager.open(IterationCommand(iteration_id="ahead", spec=spec))
    plan = live.views.plan(0)
    blocks = live.blocks
    state = blocks._cache[(0, 0)]
    state.pieces[0].result(timeout=30)
    # a stream waiting for its block's first piece starts no other block: their gathers
    # would take the cores from the piece it waits for
    held = _Block(state.number, state.start, state.bounds, [Future() for _ in state.pieces])
    blocks._cache[(0, 0)] = held
    seq = np.arange(plan.blocks[0].start, plan.blocks[0].start + 8)
    done: list[pa.Table] = []
    waiting = threading.Thread(target=lambda: done.append(blocks.rows(plan, seq).table))
    waiting.start()
    time.sleep(0.3)
    assert not done and (0, 1) not in blocks._cache and (0, 2) not in blocks._cache
    for ours, read in zip(held.pieces, state.pieces, strict=True):
        ours.set_result(read.result(timeout=30))
    waiting.join(timeout=30)
    assert done and done[0].num_rows == 8
    assert (0, 1) in blocks._cache  # then the next blocks
    # once nobody reads a block, its shards are not read: no decoding for nobody
    decoded: list[int] = []
    read_joined = blocks.reader.read_joined

    def counted(shard: Any) -> Any:
        decoded.append(shard.index)
        return read_joined(shard)

    monkeypatch.setattr(blocks.reader, "read_joined", counted)
    gone = _Block(1, plan.blocks[1].start, blocks._bounds(plan, 1), [Future()])
    gone.abandoned = True
    for slot in plan.blocks[1].shard_slots:
        with pytest.raises(Abandoned):
            blocks._read_for(gone, slot)
    assert decoded == []
    slot = plan.blocks[1].shard_slots[0]
    blocks._read_for(blocks._cache[(0, 1)], slot)  # read for a block still read: decoded
    assert decoded == [blocks.shards[slot][0]]
    blocks.clear()
    deadline = time.monotonic() + 30
    while service.read_pool.busy and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_block_whose_shards_are_decoded_does_not_wait_for_its_stores_lane(
    engine: tuple[LavenderService, IterationManager],
) -> None:
    service, _ = engine
    first = opened(engine, "decodes")
    for future in first.blocks._cache[(0, 0)].pieces:
        future.result(timeout=30)  # its shards are decoded now, kept in the server's LRU
    pool = service.read_pool
    gate = threading.Event()
    blockers = [pool.submit(LOCAL, gate.wait, 30) for _ in range(pool.limit(LOCAL))]
    try:
        # the lane is full (another iteration's reads): a block of decoded shards goes on
        again = opened(engine, "decoded")
        for future in again.blocks._cache[(0, 0)].pieces:
            future.result(timeout=30)
        assert not any(b.done() for b in blockers)
        # the same block with nothing decoded waits for the lane
        service.join_cache.budget.clear()
        cold = opened(engine, "cold")
        time.sleep(0.3)
        assert not cold.blocks._cache[(0, 0)].pieces[0].done()
    finally:
        gate.set()
    cold.blocks._cache[(0, 0)].pieces[0].result(timeout=30)
    uids = [
        state.pieces[0].result().table.column("uid").to_pylist()
        for state in (first.blocks._cache[(0, 0)], again.blocks._cache[(0, 0)])
    ]
    assert uids[0] == uids[1] and len(uids[0]) > 0  # the same seed: the same rows
    for live in (first, again, cold):
        live.blocks.clear()
    deadline = time.monotonic() + 30
    while pool.busy and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_new_iteration_records_its_order_version_and_an_old_one_keeps_version_1(
    engine: tuple[LavenderService, IterationManager],
) -> None:
    service, _ = engine
    live = opened(engine, "versioned")
    record = service.catalog.get_iteration("versioned")
    assert record.plan.order_version == ORDER_VERSION == live.views.plan(0).order_version
    # a record written before order versions existed has none: its order stays version 1
    old = IterationPlan.model_validate_json(record.plan.model_dump_json(exclude={"order_version"}))
    assert old.order_version == 1
    plans = Plans(record.spec, old)
    assert plans.epoch(0).order_version == 1 and plans.epoch(1).order_version == 1
    block = plans.epoch(0).blocks[0]
    assert plans.epoch(0).permutation(0).tolist() == (
        np.random.default_rng([record.plan.seed, 1, 0]).permutation(block.size).tolist()
    )


def test_a_stream_waiting_for_a_piece_stops_when_its_check_says_so(
    engine: tuple[LavenderService, IterationManager],
) -> None:
    live = opened(engine, "stopping")
    plan = live.views.plan(0)
    blocks = live.blocks
    state = blocks._cache[(0, 0)]
    state.pieces[0].result(timeout=30)
    held = _Block(state.number, state.start, state.bounds, [Future() for _ in state.pieces])
    blocks._cache[(0, 0)] = held  # its gather never ends
    asked: list[float] = []

    def check() -> None:  # the client goes away after the third look
        asked.append(time.monotonic())
        if len(asked) >= 3:
            raise Stopped

    seq = np.arange(plan.blocks[0].start, plan.blocks[0].start + 8)
    began = time.monotonic()
    with pytest.raises(Stopped):
        blocks.rows(plan, seq, check)
    assert len(asked) == 3 and time.monotonic() - began < 5  # not the read timeout
    assert blocks._cache[(0, 0)] is held  # left for the other streams of the rank
    for ours, read in zip(held.pieces, state.pieces, strict=True):
        ours.set_result(read.result(timeout=30))
    assert blocks.rows(plan, seq, check=lambda: None).table.num_rows == 8
    blocks.clear()
