"""The iteration's arithmetic, without a server: ranges, world, epoch plans."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lavender_flight.flight_server.engine import EpochPlan, World, replication_partitions
from lavender_flight.flight_server.engine import plan as plan_module
from lavender_flight.flight_server.engine.plan import ORDER_HEAD, ORDER_VERSION, BlockOrder
from lavender_flight.protocol.errors import InvalidArgument
from lavender_flight.protocol.iterations import IterationPlan
from lavender_flight.protocol.ranges import RangeSet, runs

SHARDS = [10, 25, 0, 13, 40, 7]
TOTAL = sum(SHARDS)


def test_rangeset_matches_a_python_set() -> None:
    rng = random.Random(0)
    for _ in range(200):
        ranges, mirror = RangeSet(), set()
        for _ in range(40):
            a = rng.randint(0, 60)
            b = a + rng.randint(0, 12)
            if rng.random() < 0.6:
                ranges.add(a, b)
                mirror |= set(range(a, b))
            else:
                ranges.remove(a, b)
                mirror -= set(range(a, b))
            assert {x for a_, b_ in ranges for x in range(a_, b_)} == mirror
            assert len(ranges) == len(mirror)
            pairs = ranges.ranges()
            assert all(pairs[i][1] < pairs[i + 1][0] for i in range(len(pairs) - 1))
            lo = rng.randint(0, 70)
            hi = lo + rng.randint(0, 20)
            gaps = {x for a_, b_ in ranges.gaps(lo, hi) for x in range(a_, b_)}
            assert gaps == set(range(lo, hi)) - mirror
            assert ranges.first_gap_start(lo, hi) == min(set(range(lo, hi)) - mirror, default=None)


def test_rangeset_pop_first_and_runs() -> None:
    ranges = RangeSet([(0, 3), (5, 9)])
    assert ranges.pop_first(5) == [(0, 3), (5, 7)]
    assert ranges.ranges() == [(7, 9)]
    assert runs(np.array([4, 5, 6, 9, 2, 3])) == [(4, 7), (9, 10), (2, 4)]
    assert runs(np.array([], dtype=np.int64)) == []


def test_replication_partitions() -> None:
    assert replication_partitions(4, None) == [0, 1, 2, 3]
    assert replication_partitions(4, [[0, 2], [1, 3]]) == [0, 1, 0, 1]
    for bad in ([[0, 1]], [[0, 1], [1, 2, 3]], [[0, 1, 2, 3], []]):
        with pytest.raises(InvalidArgument, match="exactly once"):
            replication_partitions(4, bad)
    with pytest.raises(InvalidArgument, match="rank must be within 0..1"):
        World(rank=2, world_size=2)


def test_world_workers_split_chunks() -> None:
    workers = [World(worker=w, num_workers=3) for w in range(3)]
    owners = [[w.owns(c) for w in workers].index(True) for c in range(10)]
    assert owners == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert workers[1].next_owned(5) == 7 and workers[2].next_owned(5) == 5


def test_world_workers_split_chunks_in_runs() -> None:
    workers = [World(worker=w, num_workers=3, worker_chunks=4) for w in range(3)]
    owners = [[w.owns(c) for w in workers].index(True) for c in range(26)]
    assert owners == [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [1] * 4 + [2] * 4 + [0] * 2
    for chunk in range(30):
        for world in workers:
            found = world.next_owned(chunk)
            assert world.owns(found) and found >= chunk
            assert not any(world.owns(c) for c in range(chunk, found))
            if world.owns(chunk):
                left = world.run_left(chunk)
                assert all(world.owns(c) for c in range(chunk, chunk + left))
                assert not world.owns(chunk + left)
    assert World().run_left(7) > 1 << 40  # one worker: every chunk is its run
    with pytest.raises(InvalidArgument, match="worker_chunks must be >= 1"):
        World(worker_chunks=0)


def delivered(plan: EpochPlan) -> list[list[int]]:
    return [
        plan.positions(plan.to_global(g, np.arange(plan.partition_size(g)))).tolist()
        for g in range(plan.partitions)
    ]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("partitions", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 7, 16, 105])
@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_covers_every_sample_once(
    shuffle: bool, partitions: int, batch_size: int, drop_last: bool
) -> None:
    plan = EpochPlan(
        SHARDS, batch_size, partitions, shuffle, seed=5, block_size=2, drop_last=drop_last
    )
    streams = delivered(plan)
    everything = [p for stream in streams for p in stream]
    assert len(everything) == len(set(everything)) == plan.total
    sizes = [len(s) for s in streams]
    assert max(sizes) - min(sizes) <= batch_size  # at most one batch apart
    if drop_last:
        assert len(set(sizes)) == 1 and all(n % batch_size == 0 for n in sizes)
        assert TOTAL - plan.total < batch_size * partitions
    else:
        assert sorted(everything) == list(range(TOTAL))
    if not shuffle and partitions == 1:
        assert everything == list(range(plan.total))  # shard order, no shuffle


def test_shuffle_is_seeded_and_block_local() -> None:
    first = delivered(EpochPlan(SHARDS, 8, 1, True, seed=1, block_size=2))[0]
    again = delivered(EpochPlan(SHARDS, 8, 1, True, seed=1, block_size=2))[0]
    other = delivered(EpochPlan(SHARDS, 8, 1, True, seed=2, block_size=2))[0]
    assert first == again and first != other
    plan = EpochPlan(SHARDS, 8, 1, True, seed=1, block_size=2)
    starts = np.concatenate(([0], np.cumsum(SHARDS)))
    shard_of = {p: int(np.searchsorted(starts, p, side="right") - 1) for p in range(TOTAL)}
    for block in plan.blocks:  # each block's samples come from its own shards only
        seq = np.arange(block.start, block.start + block.size)
        assert {shard_of[p] for p in plan.positions(seq).tolist()} <= set(block.shard_slots)


def test_positions_follow_the_order_of_the_sequence_numbers_given() -> None:
    """A message's rows out of order (work claimed back) get their own positions each."""
    plan = EpochPlan(SHARDS, 8, 1, True, seed=1, block_size=2)
    seq = np.arange(plan.total)
    mixed = np.random.default_rng(3).permutation(seq)
    assert plan.positions(mixed).tolist() == plan.positions(seq)[mixed].tolist()


def test_plan_refuses_bad_sizes() -> None:
    with pytest.raises(InvalidArgument, match="batch_size"):
        EpochPlan(SHARDS, 0)
    with pytest.raises(InvalidArgument, match="shuffle_block_size"):
        EpochPlan(SHARDS, 4, shuffle=True, block_size=0)


def test_each_epoch_has_its_own_order_and_epoch_zero_keeps_the_old_one() -> None:
    def order(epoch: int, seed: int = 5) -> list[int]:
        plan = EpochPlan(SHARDS, 4, shuffle=True, seed=seed, block_size=2, epoch=epoch)
        return plan.positions(np.arange(plan.total)).tolist()

    orders = [order(e) for e in range(3)]
    assert all(sorted(o) == list(range(TOTAL)) for o in orders)  # each epoch: every sample
    assert len({tuple(o) for o in orders}) == 3  # epochs differ
    assert orders == [order(e) for e in range(3)]  # the same seed: the same three orders
    # epoch 0 draws from the seeds iterations used before epochs existed
    legacy = np.random.default_rng([5, 0]).permutation(len(SHARDS)).tolist()
    assert EpochPlan(SHARDS, 4, shuffle=True, seed=5, block_size=2).blocks[0].shard_slots == (
        tuple(legacy[:2])
    )


def test_order_version_1_is_numpys_permutation_of_each_block() -> None:
    # iterations created before order versions (their plan records none) keep their order
    big = [5000, 7000, 3000]
    plan = EpochPlan(big, 64, shuffle=True, seed=9, block_size=2, order_version=1)
    for block in plan.blocks:
        legacy = np.random.default_rng([9, 1, block.number]).permutation(block.size)
        seq = np.arange(block.start, block.start + block.size)
        assert plan.permutation(block.number).tolist() == legacy.tolist()
        assert plan.rows_in_block(block.number, seq).tolist() == legacy.tolist()
    old = IterationPlan.model_validate_json('{"shards": [[0, 10], [1, 20]], "seed": 4}')
    assert old.order_version == 1


def test_order_version_2_draws_a_blocks_head_first_then_the_rest() -> None:
    size = ORDER_HEAD * 3 + 17
    order = BlockOrder([4, 1, 0], size, version=2)
    head = order.head.copy()
    assert len(head) == ORDER_HEAD and len(set(head.tolist())) == ORDER_HEAD
    assert order.upto(100).tolist() == head[:100].tolist()  # from the head: no full draw
    assert order._full is None
    full = order.full()
    assert full[:ORDER_HEAD].tolist() == head.tolist()
    assert sorted(full.tolist()) == list(range(size))
    assert order.upto(size).tolist() == full.tolist()
    again = BlockOrder([4, 1, 0], size, version=2)
    assert again.full().tolist() == full.tolist()  # the same seed, the same order
    legacy = np.random.default_rng([4, 1, 0]).permutation(size)
    assert full.tolist() != legacy.tolist()
    # a block no larger than the head is drawn whole, as version 1 draws it
    small = BlockOrder([4, 1, 0], ORDER_HEAD, version=2)
    assert small.head.tolist() == np.random.default_rng([4, 1, 0]).permutation(ORDER_HEAD).tolist()
    with pytest.raises(InvalidArgument, match="order version 3"):
        BlockOrder([4], 10, version=3)
    plan = EpochPlan([size], 8, shuffle=True, seed=4, block_size=1)
    assert plan.order_version == ORDER_VERSION == 2
    assert plan.permutation(0).tolist() == full.tolist()


def test_order_version_2_is_uniform(monkeypatch: pytest.MonkeyPatch) -> None:
    # a head of 2 of 6 places, then the other 4: every value lands in every place equally
    # often, and so does every ordered pair of the first two places (6000 seeds: 1000 per
    # value and place, 200 per pair; five standard deviations around them)
    monkeypatch.setattr(plan_module, "ORDER_HEAD", 2)
    places = np.zeros((6, 6), dtype=np.int64)
    pairs: dict[tuple[int, int], int] = {}
    for seed in range(6000):
        order = BlockOrder([seed], 6, version=2)
        assert len(order.head) == 2
        full = order.full()
        places[np.arange(6), full] += 1
        pair = (int(full[0]), int(full[1]))
        pairs[pair] = pairs.get(pair, 0) + 1
    assert np.abs(places - 1000).max() < 5 * (6000 * (1 / 6) * (5 / 6)) ** 0.5
    assert len(pairs) == 30
    assert max(abs(n - 200) for n in pairs.values()) < 5 * (6000 / 30 * (29 / 30)) ** 0.5
