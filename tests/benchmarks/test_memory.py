"""The memory suite's verdict on a trend: medians of two windows, not two single readings."""

from __future__ import annotations

import statistics

from benchmarks import memory


def test_the_windows_are_ten_iterations_after_the_warm_up_and_the_last_ten() -> None:
    early, late = memory.window_bounds(100)
    assert (early, late) == (range(10, 20), range(90, 100))
    assert memory.span(early) == "11-20" and memory.span(late) == "91-100"
    for iterations in (2, 5, 12, 29, 30):  # short runs: what follows the warm-up, halved
        early, late = memory.window_bounds(iterations)
        assert len(late) >= 1 and early.stop <= late.start and late.stop == iterations
    assert memory.window_bounds(1) == (range(1), range(1))  # one reading: no growth


def test_a_band_without_a_trend_reads_flat_and_a_leak_does_not() -> None:
    """The RSS after each iteration of a real run moved within 633-713 MB, no trend."""
    band = [633.0 + (index * 37) % 80 for index in range(100)]  # 633..712, no trend
    band[9], band[-1] = 633.0, 713.0  # the two single readings that read +80
    early, late = memory.windows(band)
    assert band[-1] - band[9] == 80.0
    assert abs(statistics.median(late) - statistics.median(early)) < 20
    leak = [value + index for index, value in enumerate(band)]  # 1 MB an iteration
    early, late = memory.windows(leak)
    assert statistics.median(late) - statistics.median(early) > 64
