"""The read pool's lanes: urgent tasks go first, queued tasks can be made urgent, and a
block's gather gives its slot to urgent work between its pieces."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.flight_server import LavenderService
from lavender_flight.flight_server.engine import IterationManager, blocks
from lavender_flight.flight_server.read_pool import CPU, ReadPool
from lavender_flight.protocol.iterations import IterationCommand, IterationSpec
from tests.flight_server.engine.test_store import write_dataset

WAIT = 30.0


@pytest.fixture
def pool() -> Iterator[ReadPool]:
    """A pool with one task at a time per local lane."""
    found = ReadPool(threads=1)
    yield found
    found.shutdown()


def held(pool: ReadPool) -> threading.Event:
    """Occupy the ``cpu`` lane's one slot until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(WAIT)

    pool.submit(CPU, hold)
    assert started.wait(WAIT)
    return release


def test_urgent_tasks_run_before_queued_ones_and_in_their_own_order(pool: ReadPool) -> None:
    ran: list[str] = []
    release = held(pool)
    futures = [pool.submit(CPU, ran.append, name) for name in ("a", "b")]
    futures += [pool.submit(CPU, ran.append, name, urgent=True) for name in ("u1", "u2")]
    assert pool.urgent_waiting(CPU) and not pool.urgent_waiting("file")
    release.set()
    for future in futures:
        future.result(WAIT)
    assert ran == ["u1", "u2", "a", "b"]
    assert not pool.urgent_waiting(CPU)


def test_promote_makes_a_tags_queued_tasks_urgent(pool: ReadPool) -> None:
    ran: list[str] = []
    tag = object()
    release = held(pool)
    futures = [
        pool.submit(CPU, ran.append, "urgent", urgent=True),
        pool.submit(CPU, ran.append, "other"),
        pool.submit(CPU, ran.append, "tagged 1", tag=tag),
        pool.submit(CPU, ran.append, "other 2"),
        pool.submit(CPU, ran.append, "tagged 2", tag=tag),
    ]
    pool.promote(tag)
    pool.promote(tag)  # again: nothing more to move
    pool.promote(object())  # a tag with no task: nothing
    release.set()
    for future in futures:
        future.result(WAIT)
    # behind the urgent task queued before, ahead of the others, in their own order
    assert ran == ["urgent", "tagged 1", "tagged 2", "other", "other 2"]


def test_a_read_ahead_gather_gives_way_to_urgent_work_between_its_pieces(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pieces of 8 rows: a 30-row block is 4 pieces; one cpu slot, so the urgent task runs
    # only when the gather lets it
    monkeypatch.setattr(blocks, "PIECE_ROWS", 8)
    monkeypatch.setattr(blocks, "FIRST_PIECE_ROWS", 8)
    pool = ReadPool(threads=1)
    service = LavenderService(catalog, read_pool=pool)
    dataset_id = write_dataset(service, tmp_path / "data")
    manager = IterationManager(catalog, service)
    try:
        spec = IterationSpec(dataset_id=dataset_id, batch_size=8, shuffle=True, shuffle_seed=3,
                             shuffle_block_size=1)  # fmt: skip
        live = manager.open(IterationCommand(iteration_id="ahead", spec=spec))
        plan = live.views.plan(0)
        for future in live.blocks._cache[(0, 0)].pieces:  # the first block (urgent): read
            future.result(WAIT)
        events: list[str] = []
        gathered = blocks.BlockReader._piece

        def piece(self: blocks.BlockReader, *args: Any) -> Any:
            events.append(f"piece {args[-2]}")
            if len(events) == 2:  # the block's second piece: urgent work comes
                pool.submit(CPU, events.append, "urgent", urgent=True)
            return gathered(self, *args)

        monkeypatch.setattr(blocks.BlockReader, "_piece", piece)
        live.blocks.prefetch(plan, 1)  # read ahead: not urgent
        state = live.blocks._cache[(0, 1)]
        assert not state.urgent and len(state.pieces) == 4
        for future in state.pieces:
            future.result(WAIT)
        # the urgent task ran as soon as the second piece was done, not after the fourth
        assert events[0] == "piece 0" and events[1].startswith("piece ")
        assert events[2] == "urgent" and len(events) == 5
        # and the block is all there, in its order: the shard's 30 uids once each
        block = plan.blocks[1]
        rows = live.blocks.rows(plan, np.arange(block.start, block.start + block.size))
        (slot,) = block.shard_slots
        uids = rows.table.column("uid").to_pylist()
        assert sorted(uids) == list(range(slot * 30, slot * 30 + 30)) and uids != sorted(uids)
    finally:
        manager.close()
