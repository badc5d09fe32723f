"""Throughput that follows the work: samples/s from the server's times, not the page's polls.

A page reads an iteration every half second or so, but the loop reports in its own rhythm
(its acknowledgements go every quarter second, in bulk). A rate taken between two polls
counts one report in one interval and two in the next, and zig-zags between two values at
a steady pace. :class:`Throughput` uses the time of each change the server recorded
instead, and the rate over the last ``window`` seconds of work, completions between two
reports taken to grow evenly: a steady loop draws a flat line, at clock times.
"""

from __future__ import annotations

import datetime as dt
import itertools

__all__ = ["Throughput", "chart_ms"]


def chart_ms(timestamp: float) -> float:
    """A UNIX time as the milliseconds a Bokeh datetime axis shows as local clock time.

    Bokeh shows datetimes as UTC: shifting by the local UTC offset makes the axis read the
    clock of the machine serving the dashboard.
    """
    offset = dt.datetime.fromtimestamp(timestamp).astimezone().utcoffset()
    return (timestamp + (offset.total_seconds() if offset else 0.0)) * 1000.0


class Throughput:
    """Samples/s of the work, one point per change the server recorded (see module doc).

    Args:
        window: seconds of work each rate is measured over.
        idle: seconds of page time without a change after which one point says 0 (the
            loop stopped or finished); default ``window``.
    """

    def __init__(self, window: float = 5.0, idle: float | None = None) -> None:
        self.window = window
        self.idle = window if idle is None else idle
        self._events: list[tuple[float, int]] = []
        """(server time of a change, samples completed then), oldest first."""
        self._seen_at: float | None = None
        self._stopped = False

    def _completed_at(self, moment: float) -> float:
        """Samples completed at a moment of the kept events (even growth between them)."""
        events = self._events
        if moment <= events[0][0]:
            return float(events[0][1])
        for (ta, ca), (tb, cb) in itertools.pairwise(events):
            if ta <= moment <= tb:
                return ca + (cb - ca) * (moment - ta) / (tb - ta) if tb > ta else float(cb)
        return float(events[-1][1])

    def observe(
        self, changed_at: float, completed: int, seen_at: float
    ) -> list[tuple[float, float]]:
        """Take one read; the new points ``(server time, samples/s)``, usually none or one.

        Args:
            changed_at: when the server last changed the iteration (``updated_at``).
            completed: samples completed then (of the current epoch).
            seen_at: when the page read it (page clock, seconds), for the idle point.
        """
        events = self._events
        if events and completed < events[-1][1]:  # a new epoch starts from 0
            events.clear()
        if events and changed_at <= events[-1][0]:
            assert self._seen_at is not None
            quiet = seen_at - self._seen_at
            if self._stopped or quiet < self.idle:
                return []
            self._stopped = True  # nothing reported for a while: the loop stopped
            return [(events[-1][0] + quiet, 0.0)]
        events.append((changed_at, completed))
        self._seen_at, self._stopped = seen_at, False
        if len(events) < 2:
            return []
        start = max(events[0][0], changed_at - self.window)
        while len(events) > 2 and events[1][0] <= start:  # older than the window needs
            events.pop(0)
        if changed_at <= start:
            return []
        rate = (completed - self._completed_at(start)) / (changed_at - start)
        return [(changed_at, max(0.0, rate))]
