"""``shipping``: batches through shared memory, as a worker packs and the loop's process
unpacks them (both in this process here), and the worker's ring of reused segments."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from lavender_flight.client import shipping
from lavender_flight.client.shipping import Bundle, Group, Shipment, Token, unpack

ROWS = 3000


@pytest.fixture
def ring(monkeypatch: pytest.MonkeyPatch) -> Iterator[shipping._Ring]:
    """A ring of this test's own (dropped, its segments unlinked, at the end)."""
    fresh = shipping._Ring()
    monkeypatch.setattr(shipping, "_ring", fresh)
    monkeypatch.setattr(shipping, "_mapped", {})
    yield fresh
    fresh.drop_all()


def segments() -> set[str]:
    return {path.name for path in Path("/dev/shm").glob(f"lf_{os.getppid()}_{os.getpid()}_*")}


def message() -> pa.RecordBatch:
    uids = np.arange(ROWS, dtype=np.int64)
    texts = [None if u % 7 == 0 else f"text {u} é" for u in range(ROWS)]
    return pa.record_batch([pa.array(uids), pa.array(texts)], names=["uid", "text"])


def sent(shipment: Shipment) -> Shipment:
    """The shipment as the loop's process receives it (pickled through torch's queue)."""
    return pickle.loads(pickle.dumps(shipment))


def test_a_message_comes_back_as_the_batches_a_loop_without_workers_gets(
    ring: shipping._Ring,
) -> None:
    sizes = [1024, 1024, ROWS - 2048]
    tokens = [Token([(0, 1024)]), Token([(1024, 2048)], 512), Token([(2048, ROWS)])]
    got = unpack(sent(Shipment.pack(message())), Group(0, tokens, sizes), "torch")
    assert [token for _, token in got] == tokens
    assert [len(batch["uid"]) for batch, _ in got] == sizes
    uids = torch.cat([batch["uid"] for batch, _ in got])
    assert torch.equal(uids, torch.arange(ROWS))
    texts = [t for batch, _ in got for t in batch["text"]]
    assert texts == message().column(1).to_pylist()


def test_what_a_collate_made_comes_back_value_for_value(ring: shipping._Ring) -> None:
    bundle = Bundle()
    made: list[tuple[Any, Any]] = []
    for start in (0, 1024):
        value = {
            "ids": torch.arange(start, start + 1024, dtype=torch.int32).reshape(32, 32),
            "np": np.full((3, 2), start, dtype=np.float16),
            "text": [f"t{u}" if u % 5 else None for u in range(start, start + 1024)],
            "empty": torch.empty((0, 4)),
            "pair": ("tag", start),
        }
        made.append((value, None))
        bundle.add((value, None))
    tokens = [Token([(0, 1024)]), Token([(1024, 2048)])]
    got = unpack(sent(bundle.ship()), Group(1, tokens), "torch")
    for (ours, token), (theirs, _), expected in zip(got, made, tokens, strict=True):
        assert token == expected
        assert torch.equal(ours["ids"], theirs["ids"]) and ours["ids"].dtype == torch.int32
        assert np.array_equal(ours["np"], theirs["np"]) and ours["np"].dtype == np.float16
        assert ours["text"] == theirs["text"]
        assert ours["empty"].shape == (0, 4)
        assert ours["pair"] == theirs["pair"]


def test_a_slot_is_written_again_once_the_loop_dropped_its_batches(
    ring: shipping._Ring,
) -> None:
    before = segments()
    first = sent(Shipment.pack(message())).open()
    second = sent(Shipment.pack(message())).open()  # the first is held: another slot
    assert len(segments() - before) == 2
    names = {slot.name for slot in ring.slots}
    mappings = dict(shipping._mapped)  # the loop's process maps each slot once
    assert set(mappings) == names
    del first
    gc.collect()
    third = sent(Shipment.pack(message())).open()
    assert {slot.name for slot in ring.slots} == names, "a new segment, not the free slot"
    assert len(segments() - before) == 2
    assert all(shipping._mapped[name] is mapping for name, mapping in mappings.items())
    assert third.column(1).to_pylist() == second.column(1).to_pylist()
    shipping.forget([os.getpid()])  # its worker went: its slots' mappings go
    assert not shipping._mapped


def test_a_worker_whose_slots_are_all_held_ships_one_off_segments(ring: shipping._Ring) -> None:
    before = segments()
    held = [sent(Shipment.pack(message())).open() for _ in range(shipping.RING_SLOTS)]
    assert len(ring.slots) == shipping.RING_SLOTS
    extra = sent(Shipment.pack(message()))  # mapped (and unlinked) as it arrives
    assert len(segments() - before) == shipping.RING_SLOTS
    assert extra.open().column(0).to_pylist() == list(range(ROWS))
    assert len(held) == shipping.RING_SLOTS
    ring.drop_all()
    assert segments() <= before
    del held  # still readable after the unlink; freed with the batches


def _write_and_wait(ready: Any) -> None:
    """A worker that writes a segment, says so, and waits to be killed (no exit hook runs)."""
    import time

    shipping._create(1024)
    ready.set()
    time.sleep(60)


def test_what_a_killed_worker_wrote_goes_once_it_has_ended() -> None:
    # torch terminates a worker slower than its shutdown wait; a terminated worker unlinks
    # nothing, so the loop's process does it when the worker's sentinel says it has ended
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    worker = context.Process(target=_write_and_wait, args=(ready,))
    worker.start()
    try:
        assert ready.wait(60), "the worker never wrote its segment"
        mine = f"lf_{os.getpid()}_{worker.pid}_*"
        assert list(Path("/dev/shm").glob(mine)), "the segment is not where sweeps look"
        shipping.sweep_when_gone([worker])
        time.sleep(0.3)
        assert list(Path("/dev/shm").glob(mine)), "swept while its worker was alive"
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while list(Path("/dev/shm").glob(mine)):
            assert time.monotonic() < deadline, "a killed worker's segment outlived it"
            time.sleep(0.05)
    finally:
        worker.kill()
        worker.join()
