"""``MixtureOrder``: draws by weight, per seed and epoch, under each ``on_exhausted``, without a
server. Tolerances are binomial: a source of weight ``w`` among ``n`` draws is within four
standard deviations, ``4 * sqrt(w * (1 - w) / n)`` (0.02 at ``w = 0.5`` over 10,000)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lavender_flight.flight_server.engine.changes import Changes, WeightEntry
from lavender_flight.flight_server.engine.draws import (
    BLOCK,
    MixtureOrder,
    epoch_key,
)
from lavender_flight.protocol.errors import InvalidArgument


def draws(order: MixtureOrder, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The source and draw number of every seq of the epoch (or of the first ``stop``)."""
    return order.locate(np.arange(order.total if stop is None else stop))


def within(share: float, weight: float, n: int) -> bool:
    return abs(share - weight) <= 4 * math.sqrt(weight * (1 - weight) / n)


@pytest.mark.parametrize(
    "weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (1.0, 2.0, 7.0)], ids=["two", "three", "relative"]
)
def test_proportions_follow_the_weights_over_10000_samples(weights: tuple[float, ...]) -> None:
    n = 10_000
    order = MixtureOrder([10**6] * len(weights), [(0, weights)], "stop", epoch_key(11, 0))
    source, _ = draws(order, n)
    shares = np.bincount(source, minlength=len(weights)) / n
    expected = np.array(weights) / sum(weights)
    for got, want in zip(shares, expected, strict=True):
        assert within(float(got), float(want), n), (shares, expected)


def test_the_same_seed_and_epoch_give_the_same_draws() -> None:
    def order(seed: int, epoch: int) -> np.ndarray:
        made = MixtureOrder([5000, 3000], [(0, (0.6, 0.4))], "rebalance", epoch_key(seed, epoch))
        return draws(made)[0]

    first = order(7, 0)
    assert np.array_equal(first, order(7, 0))
    assert not np.array_equal(first, order(8, 0))
    assert not np.array_equal(first, order(7, 1))  # each epoch draws anew


def test_each_source_numbers_its_draws_in_seq_order() -> None:
    order = MixtureOrder([400_000, 300_000], [(0, (0.5, 0.5))], "rebalance", epoch_key(3, 0))
    source, draw = draws(order)
    for s, size in enumerate((400_000, 300_000)):
        assert np.array_equal(draw[source == s], np.arange(size))  # each sample exactly once
    # any seqs, in any order, map as the epoch does
    picked = np.random.default_rng(0).permutation(order.total)[:5000]
    got_source, got_draw = order.locate(picked)
    assert np.array_equal(got_source, source[picked])
    assert np.array_equal(got_draw, draw[picked])
    assert np.array_equal(order.counts_before(123_457), np.bincount(source[:123_457]))


def test_stop_ends_the_epoch_with_the_first_source_that_runs_out() -> None:
    order = MixtureOrder([2000, 6000], [(0, (0.5, 0.5))], "stop", epoch_key(1, 0))
    source, draw = draws(order)
    counts = np.bincount(source)
    assert counts[0] == 2000 and counts[1] < 6000  # source 0 ran out: the epoch ended there
    assert source[-1] == 0 and draw[-1] == 1999
    assert np.array_equal(draw[source == 1], np.arange(counts[1]))  # no sample twice


def test_cycle_starts_a_new_pass_until_every_source_did_one() -> None:
    order = MixtureOrder([1000, 5000], [(0, (0.5, 0.5))], "cycle", epoch_key(2, 0))
    source, draw = draws(order)
    counts = np.bincount(source)
    assert counts[1] == 5000 and source[-1] == 1  # the epoch ends with the last first pass
    assert counts[0] > 3000  # source 0 went round several times
    assert np.array_equal(draw[source == 0], np.arange(counts[0]))  # pass p: draws p*size..


def test_rebalance_goes_on_with_the_others_renormalized() -> None:
    order = MixtureOrder([1000, 5000, 3000], [(0, (0.6, 0.2, 0.2))], "rebalance",
                         epoch_key(4, 0))  # fmt: skip
    source, _ = draws(order)
    assert order.total == 9000 and np.array_equal(np.bincount(source), [1000, 5000, 3000])
    gone = int(np.flatnonzero(source == 0)[-1]) + 1  # source 0 ran out there
    after = source[gone : gone + 4000]
    assert 0 not in after
    assert within(float((after == 1).mean()), 0.5, len(after))  # 0.2 : 0.2, renormalized


def test_a_source_with_weight_zero_is_left_out_and_holds_no_epoch_open() -> None:
    order = MixtureOrder([1000, 1000], [(0, (1.0, 0.0))], "cycle", epoch_key(5, 0))
    source, _ = draws(order)
    assert order.total == 1000 and not (source == 1).any()
    order = MixtureOrder([1000, 1000], [(0, (1.0, 0.0))], "rebalance", epoch_key(5, 0))
    assert order.total == 1000


def test_a_weight_change_keeps_what_came_before_and_shows_after() -> None:
    sizes = [10**6, 10**6]
    before = MixtureOrder(sizes, [(0, (0.9, 0.1))], "stop", epoch_key(6, 0))
    start = 3 * BLOCK + 1234
    after = before.changed(start, (0.1, 0.9), version=1)
    first, _ = draws(before, start + 20_000)
    second, draw = draws(after, start + 20_000)
    assert np.array_equal(first[:start], second[:start])  # the same order up to the change
    assert within(float((second[start:] == 1).mean()), 0.9, 20_000)
    assert within(float((second[:start] == 1).mean()), 0.1, start)
    for s in (0, 1):  # draws still count on: no sample twice across the change
        assert np.array_equal(draw[second == s], np.arange(int((second == s).sum())))
    fresh = MixtureOrder(sizes, [(0, (0.9, 0.1)), (start, (0.1, 0.9))], "stop", epoch_key(6, 0))
    assert np.array_equal(draws(fresh, start + 20_000)[0], second)  # as a resume rebuilds it


def test_a_later_change_replaces_the_ones_planned_after_it() -> None:
    changes = Changes(
        3,
        (
            WeightEntry(1, 0, 500, (0.5, 0.5), 0.0),
            WeightEntry(2, 0, 900, (0.1, 0.9), 0.0),
            WeightEntry(3, 0, 700, (0.9, 0.1), 0.0),
            WeightEntry(4, 1, 0, (0.3, 0.7), 0.0),
        ),
    )
    initial = (1.0, 1.0)
    assert changes.schedule(0, initial) == [(0, initial), (500, (0.5, 0.5)), (700, (0.9, 0.1))]
    assert changes.schedule(1, initial) == [(0, (0.3, 0.7))]  # the epoch's own, at 0
    assert changes.schedule(2, initial) == [(0, (0.3, 0.7))]  # carried on


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ((0.0, 0.0), "all 0"),
        ((1.0, -1.0), "must be a finite number >= 0"),
        ((1.0, float("nan")), "must be a finite number >= 0"),
    ],
)
def test_weights_that_cannot_work_are_refused(weights: tuple[float, ...], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        MixtureOrder([10, 10], [(0, weights)], "stop", 1)


def test_a_cycle_too_long_for_a_tiny_weight_is_refused_at_once() -> None:
    order = MixtureOrder([10**6, 10], [(0, (1.0, 1e-12))], "cycle", 1)
    with pytest.raises(InvalidArgument, match="weight is too small for on_exhausted='cycle'"):
        _ = order.total
