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
