"""``RankState``: claims, streams, pushback, leases, takes and completions, without a server."""

from __future__ import annotations

import random

import pytest

from lavender_flight.flight_server.engine import RankState, World
from lavender_flight.flight_server.engine.state import _by_chunk, merged
from lavender_flight.protocol.errors import InvalidArgument

FAR = 1e18


def claim(state: RankState, key: tuple[int, int], generation: int, world: World, chunks: int = 1):
    stream = state.stream(key, generation)
    assert stream is not None
    return state.claim(stream, world, chunks).units


def test_streams_pushback_and_completions() -> None:
    state = RankState(size=20, batch_size=8)
    world = World()
    key = (0, 1)
    generation = state.open_stream(key, "nd-a", FAR)
    assert claim(state, key, generation, world) == [[(0, 8)]]
    assert claim(state, key, generation, world) == [[(8, 16)]]
    state.take([(0, 8)])
    assert state.complete([(0, 8)]) == 8
    assert state.pushback() == 8  # (8, 16) back to the queue
    assert claim(state, key, generation, world) == [[(8, 16)]]  # pending first
    assert claim(state, key, generation, world) == [[(16, 20)]]
    assert claim(state, key, generation, world) == []
    # a new stream of the same worker supersedes the old one and takes back what it held
    assert state.open_stream(key, "nd-a", FAR) == generation + 1
    assert state.stream(key, generation) is None
    assert state.pending_count == 12 and state.read_ahead == 0
    assert state.complete([(8, 20)]) == 12
    assert state.done and state.completed == 20


def claim_in_turn(
    state: RankState, worker_chunks: int = 1
) -> tuple[dict[int, list[list[tuple[int, int]]]], dict[int, int]]:
    """Two workers claiming 2 chunks in turn until the rank runs dry: their units, generations."""
    got: dict[int, list[list[tuple[int, int]]]] = {0: [], 1: []}
    worlds = {w: World(worker=w, num_workers=2, worker_chunks=worker_chunks) for w in (0, 1)}
    generations = {w: state.open_stream((w, 2), "nd-a", FAR) for w in (0, 1)}
    while True:
        progressed = False
        for w in (0, 1):
            work = claim(state, (w, 2), generations[w], worlds[w], chunks=2)
            got[w].extend(work)
            progressed |= bool(work)
        if not progressed:
            return got, generations


def test_workers_share_a_rank() -> None:
    got, _ = claim_in_turn(RankState(size=30, batch_size=5))
    assert got[0] == [[(0, 5)], [(10, 15)], [(20, 25)]]
    assert got[1] == [[(5, 10)], [(15, 20)], [(25, 30)]]


def test_workers_share_a_rank_in_runs_of_chunks() -> None:
    # runs of 3 chunks: a claim takes its worker's run (up to the end of it) in one range
    state = RankState(size=62, batch_size=5)
    got, generations = claim_in_turn(state, worker_chunks=3)
    assert got[0] == [[(0, 5)], [(5, 10)], [(10, 15)], [(30, 35)], [(35, 40)], [(40, 45)],
                      [(60, 62)]]  # fmt: skip
    assert got[1] == [[(15, 20)], [(20, 25)], [(25, 30)], [(45, 50)], [(50, 55)], [(55, 60)]]
    # what a worker holds is one range per run, not one per chunk
    held = {w: state.stream((w, 2), generations[w]) for w in (0, 1)}
    assert held[0] is not None and held[0].held.ranges() == [(0, 15), (30, 45), (60, 62)]
    assert held[1] is not None and held[1].held.ranges() == [(15, 30), (45, 60)]
    assert state.complete([(0, 62)]) == 62


def test_runs_of_chunks_and_pushed_back_samples_in_order() -> None:
    state = RankState(size=23, batch_size=5)
    key = (0, 1)
    generation = state.open_stream(key, "nd-a", FAR)
    state.covered.add(7, 9)
    state.finished.add(7, 9)  # finished earlier (e.g. before a restart)
    assert claim(state, key, generation, World(), 3) == [[(0, 5)], [(5, 7), (9, 10)], [(10, 15)]]
    assert state.pushback() == 13
    assert claim(state, key, generation, World(), 2) == [[(0, 5)], [(5, 7), (9, 10)]]
    assert claim(state, key, generation, World(), 10) == [[(10, 15)]]
    assert claim(state, key, generation, World(), 10) == [[(15, 20)], [(20, 23)]]


def test_progress_follows_the_loop_not_the_read_ahead() -> None:
    state = RankState(size=40, batch_size=4)
    key = (0, 1)
    generation = state.open_stream(key, "nd-a", FAR)
    claim(state, key, generation, World(), 6)  # 24 samples claimed ahead
    assert (state.current, state.completed, state.read_ahead) == (0, 0, 24)
    state.take([(0, 4), (4, 8)])
    state.complete([(0, 4)])
    assert (state.current, state.completed, len(state.inflight)) == (8, 4, 4)
    assert state.read_ahead == 16
    # a filter dropped 2 samples inside the completed batch's span: they are not delivered
    assert state.complete([(4, 8)], filtered=2) == 2
    assert (state.completed, state.filtered) == (6, 2)
    # pushback returns what the loop did not complete, and the loop will take it again
    assert state.pushback() == 16 and state.current == 8


def test_acks_only_for_what_was_sent() -> None:
    state = RankState(size=40, batch_size=4)
    generation = state.open_stream((0, 1), "nd-a", FAR)
    claim(state, (0, 1), generation, World(), 2)
    with pytest.raises(InvalidArgument, match=r"\[8, 12\) were never sent"):
        state.complete([(4, 12)])
    with pytest.raises(InvalidArgument, match="outside the rank's 40 samples"):
        state.take([(38, 44)])
    assert state.completed == 0  # nothing changed


def test_leases_and_dead_servers_free_samples_for_any_worker() -> None:
    state = RankState(size=40, batch_size=4)
    live = state.open_stream((0, 2), "nd-a", lease_until=100.0)
    dying = state.open_stream((1, 2), "nd-b", lease_until=1000.0)
    claim(state, (0, 2), live, World(worker=0, num_workers=2))
    claim(state, (1, 2), dying, World(worker=1, num_workers=2))  # chunk 1: [4, 8)
    assert state.expire(now=50.0) == 0
    assert state.expire(now=50.0, dead_nodes=frozenset({"nd-b"})) == 4
    # worker 0 takes the dead stream's chunk first, though it is not its own
    assert claim(state, (0, 2), live, World(worker=0, num_workers=2)) == [[(4, 8)]]
    assert state.expire(now=150.0) == 8  # worker 0's own lease ran out too
    assert state.streams == {}


def test_the_state_survives_its_json_form() -> None:
    state = RankState(size=40, batch_size=4)
    generation = state.open_stream((0, 1), "nd-a", FAR)
    claim(state, (0, 1), generation, World(), 3)
    state.take([(0, 4)])
    state.complete([(0, 4)], filtered=1)
    again = RankState.from_json(state.to_json())
    assert again == state


def test_chunk_grouping_matches_cutting_sample_by_sample() -> None:
    rng = random.Random(5)
    for _ in range(500):
        batch = rng.randint(1, 9)
        ranges, cursor = [], rng.randint(0, 20)
        for _ in range(rng.randint(0, 6)):
            start = cursor + rng.randint(0, 12)
            cursor = start + rng.randint(0, 30)
            ranges.append((start, cursor))
        if rng.random() < 0.3:
            rng.shuffle(ranges)  # out of order: grouped by chunk all the same
        by_chunk: dict[int, list[int]] = {}
        for value in sorted(v for a, b in ranges for v in range(a, b)):
            by_chunk.setdefault(value // batch, []).append(value)
        units = _by_chunk(ranges, batch)
        assert [sorted(v for a, b in unit for v in range(a, b)) for unit in units] == [
            by_chunk[c] for c in sorted(by_chunk)
        ]
        flat = sorted(r for unit in units for r in unit)
        assert sum(b - a for a, b in merged(units)) == sum(b - a for a, b in flat)


def test_a_fresh_claim_is_its_ranges_and_its_units_are_cut_from_them() -> None:
    # a fresh claim carries a few ranges (held as they are); its units are cut when asked
    state = RankState(size=100, batch_size=10)
    key = (0, 1)
    generation = state.open_stream(key, "nd-a", FAR)
    state.covered.add(13, 15)
    state.covered.add(41, 60)
    stream = state.stream(key, generation)
    assert stream is not None
    found = state.claim(stream, World(), 5)
    assert found.ranges == [(0, 13), (15, 41)]  # chunk 1 (two gaps) counts once
    assert found.samples == 13 + 26
    assert found.units == _by_chunk(found.ranges, 10) and len(found.units) == 5
    after = state.claim(stream, World(), 2)  # past the covered 41-60, touching runs joined
    assert after.ranges == [(60, 80)] and after.units == [[(60, 70)], [(70, 80)]]
    assert stream.held.ranges() == [(0, 13), (15, 41), (60, 80)]
