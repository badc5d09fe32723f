"""``RankFlow``'s read-ahead window: how it grows with a loop's reports, and its bounds."""

from __future__ import annotations

from lavender_flight.flight_server.engine.flow import GROWTH, STARVED_GROWTH, RankFlow, ReadAhead
from lavender_flight.flight_server.engine.state import RankState, StreamKey, StreamState
from lavender_flight.flight_server.engine.store import StreamHandle
from lavender_flight.protocol.ranges import RangeSet

BATCH = 1024


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def report(flow: RankFlow, taken: int) -> None:
    """The loop reports it took the first ``taken`` samples (as the catalog has it)."""
    state = RankState(size=10_000_000, batch_size=BATCH, taken=RangeSet([(0, taken)]))
    with flow.cond:
        flow.learn(state)


def test_a_starved_loop_grows_the_window_fast_up_to_the_byte_bound() -> None:
    clock = Clock()
    budget = ReadAhead(seconds=0.5, max_bytes=64 << 20, min_batches=2)
    flow = RankFlow(BATCH, budget, clock)
    flow.row_bytes = 100.0
    assert flow.window() == 2 * BATCH
    windows, taken = [], 0
    for _ in range(12):  # a loop taking 1M samples a second, all it was sent (none ahead)
        taken += max(BATCH, flow.window() // 3)
        clock.now += taken / 1e6 - (clock.now - 100.0)
        report(flow, taken)
        windows.append(flow.window())
    # before the pace is known (reports within 5 ms): STARVED_GROWTH-fold each report
    assert windows[:2] == [2 * BATCH * STARVED_GROWTH, 2 * BATCH * STARVED_GROWTH**2]
    # and never more than that after
    assert all(w <= 2 * BATCH * STARVED_GROWTH ** (i + 1) for i, w in enumerate(windows))
    # then about 0.5 s of its pace (1M/s), never over 64 MiB of 100-byte rows
    assert max(windows) <= (64 << 20) // 100
    assert windows[-1] >= 0.4 * 1e6 * budget.seconds


def test_a_slow_loop_keeps_about_half_a_second_of_its_pace() -> None:
    clock = Clock()
    flow = RankFlow(BATCH, ReadAhead(seconds=0.5), clock)
    taken = 0
    for _ in range(20):  # 10 batches a second
        clock.now += 0.1
        taken += BATCH
        report(flow, taken)
    pace = 10 * BATCH
    assert flow.window() <= max(2 * BATCH, int(pace * 0.5) + BATCH)
    assert flow.window() >= 2 * BATCH


def test_the_window_never_goes_below_its_minimum() -> None:
    clock = Clock()
    flow = RankFlow(BATCH, ReadAhead(seconds=0.5, min_batches=3), clock)
    for step in range(1, 6):  # a loop that takes one batch every 10 s
        clock.now += 10.0
        report(flow, step * BATCH)
    assert flow.window() == 3 * BATCH


def test_a_loop_busy_with_what_it_holds_grows_the_window_growth_fold() -> None:
    # a slow loop's first reports come in a burst (its pace looks fast): with batches ahead
    # of it, the window only doubles, so the burst cannot size it
    clock = Clock()
    flow = RankFlow(BATCH, ReadAhead(seconds=0.5), clock)
    key: StreamKey = (0, 0)
    stream = StreamHandle("it", 0, 0, key, generation=1)
    windows, taken = [], 0
    for _ in range(4):
        sent = taken + flow.window()
        with flow.cond:  # the stream sent its whole window; the loop took half of it
            flow.claimed(stream, [(taken, sent)])
            flow.went_out(stream, [(taken, sent)], sent - taken, 100 * (sent - taken))
        taken += flow.window() // 2
        clock.now += 0.001
        state = RankState(size=10_000_000, batch_size=BATCH, taken=RangeSet([(0, taken)]))
        state.streams[key] = StreamState(1, "node", 0.0, RangeSet([(taken, sent)]))
        with flow.cond:
            flow.learn(state)
        windows.append(flow.window())
    assert windows == [2 * BATCH * GROWTH ** (i + 1) for i in range(4)]


def test_what_the_loop_took_leaves_the_spans_sent_and_ahead_stays_what_it_was() -> None:
    # a worker's share: every other batch, a range each. Once the loop took the first
    # half, only the second half stays in the spans sent (``ahead`` walks them on every
    # claim and report): what it counts is what it counted before
    flow = RankFlow(BATCH, ReadAhead(seconds=0.5), Clock())
    key: StreamKey = (0, 2)
    stream = StreamHandle("it", 0, 0, key, generation=1)
    share = [(b * BATCH, (b + 1) * BATCH) for b in range(0, 400, 2)]
    with flow.cond:
        flow.claimed(stream, share)
        flow.went_out(stream, share, len(share) * BATCH, 100 * len(share) * BATCH)
    taken = 200 * BATCH
    state = RankState(size=10_000_000, batch_size=BATCH, taken=RangeSet([(0, taken)]))
    state.streams[key] = StreamState(1, "node", 0.0, RangeSet(share))
    expected = sum(b - a for a, b in share if a >= taken)
    with flow.cond:
        flow.learn(state)
        assert flow.ahead(stream) == expected == 100 * BATCH
        assert flow.sent[stream].ranges() == [r for r in share if r[0] >= taken]
    # a batch pushed back and claimed again is not ahead until it is sent again
    state.taken = RangeSet([(0, taken - 2 * BATCH)])
    with flow.cond:
        flow.learn(state)
        assert flow.ahead(stream) == expected
        flow.went_out(stream, [(taken - 2 * BATCH, taken - BATCH)], BATCH, 100 * BATCH)
        assert flow.ahead(stream) == expected + BATCH
