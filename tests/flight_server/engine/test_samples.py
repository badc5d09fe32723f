"""``SampleSet``: the dropped samples of a stream as one sorted array."""

from __future__ import annotations

import numpy as np

from lavender_flight.flight_server.engine.samples import SampleSet


def test_adding_keeps_one_sorted_array_without_duplicates() -> None:
    found = SampleSet()
    found.add(np.array([3, 4, 9]))  # sorted, after: appended
    found.add(np.array([12, 10, 10, 11]))  # unsorted, with a duplicate
    found.add(np.array([4, 5, 6]))  # overlapping what is there
    found.add(SampleSet([20, 1]))
    assert found.values.tolist() == [1, 3, 4, 5, 6, 9, 10, 11, 12, 20]
    assert found.ranges() == [(1, 2), (3, 7), (9, 13), (20, 21)]
    assert len(found) == 10 and 11 in found and 7 not in found


def test_popping_within_ranges_takes_them_out() -> None:
    found = SampleSet.of_ranges([(0, 5), (10, 15)])
    taken = found.pop_within([(3, 12)])
    assert taken.values.tolist() == [3, 4, 10, 11]
    assert found.ranges() == [(0, 3), (12, 15)]
    found.discard(SampleSet([0, 14]))
    assert found.ranges() == [(1, 3), (12, 14)]


def _inside(numbers: set[int], ranges: list[tuple[int, int]]) -> set[int]:
    return {n for n in numbers if any(a <= n < b for a, b in ranges)}


def test_within_and_pop_within_match_a_python_set_across_many_holes() -> None:
    rng = np.random.default_rng(16)
    for _ in range(200):
        numbers = set(rng.choice(400, size=int(rng.integers(0, 300)), replace=False).tolist())
        found = SampleSet(np.array(sorted(numbers), dtype=np.int64))
        for _ in range(6):
            count = int(rng.integers(0, 5))
            bounds = np.sort(rng.integers(-5, 410, size=2 * count)).reshape(-1, 2)
            ranges = [(int(a), int(b)) for a, b in bounds]
            if rng.random() < 0.3 and ranges:  # out of order, overlapping
                ranges.append((ranges[0][0] - 3, ranges[-1][1] + 3))
                ranges.reverse()
            expected = _inside(numbers, ranges)
            assert found.within(ranges).values.tolist() == sorted(expected)
            assert found.pop_within(ranges).values.tolist() == sorted(expected)
            numbers -= expected
            assert found.values.tolist() == sorted(numbers) and len(found) == len(numbers)


def test_spans_in_order_take_the_front_of_every_other_sample() -> None:
    # a filter keeping every other sample: each batch's span takes its dropped half
    found = SampleSet(np.arange(1, 20_000, 2))
    taken = 0
    for start in range(0, 20_000, 2048):
        inside = found.pop_within([(start, start + 2048)])
        assert len(inside) == len(range(start + 1, min(start + 2048, 20_000), 2))
        assert inside.values[0] == start + 1
        taken += len(inside)
        found.add(np.array([30_000 + start]))  # what later blocks drop, added behind
    assert taken == 10_000 and found.values.tolist() == [30_000 + s for s in range(0, 20_000, 2048)]


def test_discarding_matches_a_python_set_for_runs_and_scattered_numbers() -> None:
    # what an ack forgets is usually a run of the set's positions (at the front, or inside
    # when an earlier message is acked later); numbers the set lacks, or several runs, too
    rng = np.random.default_rng(7)
    for _ in range(300):
        numbers = sorted(set(rng.choice(500, size=int(rng.integers(1, 200)), replace=False)))
        found = SampleSet(np.array(numbers, dtype=np.int64))
        kind = rng.integers(0, 3)
        if kind == 0:  # a run of positions
            a = int(rng.integers(0, len(numbers)))
            gone = numbers[a : a + int(rng.integers(1, len(numbers) - a + 1))]
        elif kind == 1:  # scattered, some not in the set
            gone = sorted(set(rng.choice(520, size=int(rng.integers(1, 40)), replace=False)))
        else:  # a run with one number missing from the set
            a = int(rng.integers(0, len(numbers)))
            gone = sorted({*numbers[a : a + 5], 1000})
        found.discard(SampleSet(np.array(gone, dtype=np.int64)))
        expected = sorted(set(numbers) - set(gone))
        assert found.values.tolist() == expected and len(found) == len(expected)
