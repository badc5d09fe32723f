"""An iteration's page, live while a job runs: four bars, what is in flight, throughput."""

from __future__ import annotations

import html
import time
from typing import Any

import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource
from bokeh.plotting import figure

from ..protocol.iterations import IterationProgress
from .common import TABLE_CSS, Page, format_time, html_table, link

__all__ = ["BARS", "IterationPage", "inflight_frame"]

BARS = ("current", "completed", "filtered", "failed")
"""The four counts of an iteration, each shown as a bar out of its total."""

SHOWN_POSITIONS = 20


def inflight_frame(progress: IterationProgress) -> pd.DataFrame:
    """One row per rank holding samples: the rank, how many, the first positions held."""
    rows = []
    for rank in progress.ranks:
        if not rank.inflight:
            continue
        positions = progress.inflight.get(rank.rank, [])
        shown = ", ".join(str(p) for p in positions[:SHOWN_POSITIONS])
        if rank.inflight > SHOWN_POSITIONS:
            shown += f", ... ({rank.inflight - SHOWN_POSITIONS} more)"
        rows.append({"rank": rank.rank, "samples": rank.inflight, "positions": shown})
    return pd.DataFrame(rows, columns=["rank", "samples", "positions"])


class IterationPage(Page):
    """Progress of one iteration, read every ``period_ms`` while the page is open.

    ``throughput`` holds one point per poll: seconds since the page opened and the samples
    completed per second since the previous poll.
    """

    iteration_id = param.String(default="", doc="The iteration shown.")
    progress = param.ClassSelector(class_=IterationProgress, default=None, doc="Last read.")
    inflight = param.DataFrame(default=None, doc="One row per rank holding samples.")
    throughput = param.DataFrame(default=None, doc="Columns seconds, samples_per_s.")
    period_ms = param.Integer(default=500, bounds=(50, None), doc="How often to poll.")
    history = param.Integer(default=600, bounds=(2, None), doc="Throughput points kept.")
    clock = param.Callable(default=time.monotonic, doc="Seconds, for throughput (tests fake it).")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        css = [TABLE_CSS]
        self._summary = pn.pane.HTML("", stylesheets=css, sizing_mode="stretch_width")
        self._labels = {
            name: pn.pane.HTML("", stylesheets=css, width=260, margin=(6, 10)) for name in BARS
        }
        colors = {"current": "info", "completed": "success", "filtered": "warning"}
        self.bars = {
            name: pn.indicators.Progress(
                value=0,
                max=1,
                bar_color=colors.get(name, "danger"),
                sizing_mode="stretch_width",
                margin=(8, 10),
                css_classes=[f"lf-bar-{name}"],
            )
            for name in BARS
        }
        self._inflight = pn.pane.HTML("", stylesheets=css, sizing_mode="stretch_width")
        self._source = ColumnDataSource(data={"seconds": [], "samples_per_s": []})
        chart = figure(
            height=260,
            sizing_mode="stretch_width",
            x_axis_label="seconds since the page opened",
            y_axis_label="samples/s",
            tools="",
            toolbar_location=None,
        )
        chart.line("seconds", "samples_per_s", source=self._source, line_width=2, color="#5b3a99")
        self._chart = pn.pane.Bokeh(chart, sizing_mode="stretch_width")
        self._pushback = pn.widgets.Button(label="Pushback", color="warning")
        self._pushback.on_click(self._on_pushback)
        self._opened: float | None = None
        self._last: tuple[float, int] | None = None
        self._points: list[tuple[float, float]] = []
        self._poll: Any = None
        self.refresh()

    def refresh(self, now: float | None = None) -> None:
        """Read the progress; add a throughput point from the change since the last read.

        Args:
            now: The time of this read in seconds (default: ``clock()``).
        """
        now = self.clock() if now is None else now
        progress: IterationProgress | None = None
        with self.calling():
            progress = self.connection.get_iteration(self.iteration_id)
        if progress is None:
            return
        if self._opened is None:
            self._opened = now
        if self._last is not None and now > self._last[0]:
            rate = max(0.0, (progress.completed - self._last[1]) / (now - self._last[0]))
            point = (round(now - self._opened, 3), round(rate, 3))
            self._points = [*self._points, point][-self.history :]
            self._source.stream(
                {"seconds": [point[0]], "samples_per_s": [point[1]]}, rollover=self.history
            )
            self.throughput = pd.DataFrame(self._points, columns=["seconds", "samples_per_s"])
        self._last = (now, progress.completed)
        self.inflight = inflight_frame(progress)
        self.progress = progress

    def _on_pushback(self, _event: object) -> None:
        self.pushback()

    def pushback(self) -> int | None:
        """Return every in-flight sample to the queue; say how many."""
        count: int | None = None
        with self.calling():
            count = self.connection.pushback(self.iteration_id)
        if count is None:
            self.message = ""
            return None
        self.message = f"Pushed back {count} in-flight samples: they return to the queue."
        self.refresh()
        return count

    def start_polling(self) -> None:
        """Poll every ``period_ms`` in the browser session (stops when the session ends)."""
        if self._poll is None:
            self._poll = pn.state.add_periodic_callback(self.refresh, period=self.period_ms)

    def stop_polling(self) -> None:
        """Stop polling."""
        if self._poll is not None:
            self._poll.stop()
            self._poll = None

    @param.depends("progress", watch=True)
    def _render(self) -> None:
        p = self.progress
        if p is None:
            return
        for name in BARS:
            value, top = int(getattr(p, name)), max(1, p.total)
            bar = self.bars[name]
            if (bar.value or 0) > top:  # the bounds are checked on every assignment
                bar.value = 0
            bar.max = top
            bar.value = min(value, top)
            self._labels[name].object = (
                f'{name} <b id="lf-{name}">{value}</b> / {p.total}'
                f" ({100 * value / p.total if p.total else 0:.0f}%)"
            )
        spec = p.spec
        held = sum(r.inflight for r in p.ranks)
        shuffle = f"yes (seed {p.seed})" if spec.shuffle else "no"
        self._summary.object = (
            f'<p id="iteration-summary">dataset {link("dataset", p.dataset_id, id=p.dataset_id)}'
            f" · batch size {spec.batch_size} · shuffle "
            f"{html.escape(shuffle)} · world size {spec.world_size}"
            f" · created {format_time(p.created_at)} · updated {format_time(p.updated_at)}"
            f' · <b id="lf-state">{"done" if p.done else "running"}</b></p>'
            f'<p>in flight: <b id="lf-inflight">{held}</b> samples'
            f" · pending again: {sum(r.pending for r in p.ranks)}</p>"
        )
        self._inflight.object = html_table(
            self.inflight, "inflight-table", empty="Nothing in flight."
        )

    def __panel__(self) -> pn.viewable.Viewable:
        rows = [pn.Row(self._labels[name], self.bars[name]) for name in BARS]
        return self.layout(
            f"Iteration {self.iteration_id}",
            self._summary,
            *rows,
            pn.pane.HTML("<h3>In flight</h3>"),
            pn.Row(self._pushback),
            self._inflight,
            pn.pane.HTML("<h3>Throughput (samples/s)</h3>"),
            self._chart,
        )
