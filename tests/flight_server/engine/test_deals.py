"""``deal_anew``: what a world did not finish, dealt to another number of ranks, without a
server. Ranks stand where a crash leaves them: some finished, some in flight, stragglers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from lavender_flight.flight_server.engine import EpochPlan, RankState, World
from lavender_flight.flight_server.engine.deals import Deal, deal_anew, ranges_to_global

FAR = 1e18


def crashed_world(plan: EpochPlan, progress: list[float], batch: int) -> dict[int, RankState]:
    """States of ``len(progress)`` ranks that streamed that share of their partition.

    Each rank completed all but its last two claimed batches (one taken, one read ahead).
    """
    states = {}
    for rank, share in enumerate(progress):
        state = RankState(plan.partition_size(rank), batch)
        key = (0, 1)
        generation = state.open_stream(key, "nd-a", FAR)
        stream = state.stream(key, generation)
        assert stream is not None
        chunks = int(share * state.size) // batch
        units = state.claim(stream, World(rank, len(progress)), chunks).units
        done = [r for unit in units[:-2] for r in unit]
        state.take([r for unit in units[:-1] for r in unit])
        state.complete(done)
        states[rank] = state
    return states


def finished_globals(plan: EpochPlan | Deal, states: dict[int, RankState]) -> list[int]:
    found: list[int] = []
    for rank, state in states.items():
        for a, b in state.finished:
            found += plan.to_global(rank, np.arange(a, b)).tolist()
    return found


def dealt_globals(deal: Deal, available: int) -> dict[int, list[int]]:
    return {
        rank: deal.to_global(rank, np.arange(deal.partition_size(rank, available))).tolist()
        for rank in range(deal.world_size)
    }


@pytest.mark.parametrize("new_world", [2, 3, 5])
def test_what_is_left_is_dealt_once_and_evenly(new_world: int) -> None:
    batch = 16
    plan = EpochPlan([1000, 777, 1500, 23], batch, partitions=4, shuffle=True, seed=3)
    states = crashed_world(plan, [0.4, 0.35, 0.5, 0.0], batch)
    done = finished_globals(plan, states)
    deal = deal_anew(states, None, plan, 4, new_world, batch, drop_last=False)
    dealt = dealt_globals(deal, plan.available)
    everything = Counter(done + [g for seqs in dealt.values() for g in seqs])
    assert sorted(everything) == list(range(plan.total)) and set(everything.values()) == {1}
    sizes = [len(seqs) for seqs in dealt.values()]
    assert max(sizes) - min(sizes) <= batch  # within one batch of each other
    assert deal.carried.finished == len(done) == deal.carried.completed
    assert deal.length(plan.available) == plan.total - len(done)
    # the base: what nobody finished below the cut (stragglers, in flight), then the rest
    assert deal.explicit == len(set(range(deal.cut)) - set(done))
    assert deal.cut <= max(done) + 3 * batch * 4  # a rank's two chunks in flight past it


def test_drop_last_gives_every_new_rank_the_same_whole_batches() -> None:
    batch = 10
    plan = EpochPlan([1234], batch, partitions=4, drop_last=True)
    states = crashed_world(plan, [0.4, 0.4, 0.3, 0.4], batch)
    deal = deal_anew(states, None, plan, 4, 3, batch, drop_last=True)
    sizes = {deal.partition_size(r, plan.available) for r in range(3)}
    assert len(sizes) == 1 and sizes.pop() % batch == 0


def test_a_second_resize_deals_what_the_first_world_left() -> None:
    batch = 8
    plan = EpochPlan([3000], batch, partitions=4, shuffle=True, seed=9, block_size=1)
    first = crashed_world(plan, [0.3, 0.3, 0.2, 0.3], batch)
    deal = deal_anew(first, None, plan, 4, 2, batch, drop_last=False)
    dealt = plan.dealt(deal)
    second = crashed_world(dealt, [0.5, 0.25], batch)
    again = deal_anew(second, deal, plan, 4, 3, batch, drop_last=False)
    assert again.number == 2
    done = finished_globals(plan, first) + finished_globals(deal, second)
    left = [g for seqs in dealt_globals(again, plan.available).values() for g in seqs]
    assert sorted(done + left) == list(range(3000))
    assert again.carried.finished == len(done)


def test_local_ranges_map_to_global_runs() -> None:
    batch = 5
    plan = EpochPlan([200], batch, partitions=3)
    runs = ranges_to_global(None, plan, 1, [(0, 12)], batch)
    assert runs == [(5, 10), (20, 25), (35, 37)]
    states = crashed_world(plan, [0.5, 0.5, 0.5], batch)
    deal = deal_anew(states, None, plan, 3, 2, batch, drop_last=False)
    local = [(0, 17), (20, 23)]
    expected = np.concatenate([deal.to_global(0, np.arange(a, b)) for a, b in local])
    runs = ranges_to_global(deal, plan, 0, local, batch)
    assert np.array_equal(np.concatenate([np.arange(a, b) for a, b in runs]), np.sort(expected))
