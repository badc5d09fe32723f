"""An iteration's page, live while a job runs: what the loop sees, rank by rank, and its pace.

The four bars and the ranks table follow the training loop (current: where the loop is;
completed; filtered; failed; in flight: taken by the loop, not completed); the server's
read-ahead is shown apart, with its limit. Each rank says its epoch and the servers
(nodes) streaming it. A mixture adds its sources and its weights over time
(:mod:`.mixture`). The throughput chart follows the work (:mod:`.throughput`).
"""

from __future__ import annotations

import html
import time
from typing import Any

import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource, DatetimeTickFormatter, Range1d
from bokeh.plotting import figure

from ..protocol import Dataset
from ..protocol.errors import ActionNotFound, IterationNotFound
from ..protocol.iterations import IterationProgress, RankProgress
from .common import TABLE_CSS, Page, describe_error, format_time, html_table, link
from .deletion import ConfirmDelete, Doomed
from .mixture import schedule_frame, sources_frame
from .throughput import Throughput, chart_ms

__all__ = ["BARS", "IterationPage", "inflight_frame", "ranks_frame"]

BARS = ("current", "completed", "filtered", "failed")
"""The four counts of an iteration, each shown as a bar out of its total."""

SHOWN_POSITIONS = 20
NODES_EVERY = 10.0
"""Seconds between two reads of the servers' locations (when a rank names a new one)."""


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


def _read_ahead(rank: RankProgress) -> str:
    if rank.read_ahead_limit is None:
        return str(rank.read_ahead)
    return f"{rank.read_ahead} / {rank.read_ahead_limit}"


def ranks_frame(
    progress: IterationProgress, locations: dict[str, str] | None = None
) -> pd.DataFrame:
    """One row per rank, as its loop sees it, and the server's read-ahead apart.

    current: where the loop is; in flight: taken, not completed; read ahead: sent by the
    server ahead of the loop (``n / limit`` when the stream has a budget); pending: to be
    handed out again; nodes: the servers streaming it (their locations when known).
    """
    locations = locations or {}
    return pd.DataFrame(
        [
            {
                "rank": r.rank,
                "epoch": r.epoch,
                "total": r.total,
                "current": r.current,
                "completed": r.completed,
                "filtered": r.filtered,
                "failed": r.failed,
                "in flight": r.inflight,
                "read ahead": _read_ahead(r),
                "pending": r.pending,
                "streams": r.streams,
                "nodes": ", ".join(locations.get(n, n) for n in r.nodes),
                "done": "yes" if r.done else "no",
            }
            for r in progress.ranks
        ],
        columns=[
            "rank",
            "epoch",
            "total",
            "current",
            "completed",
            "filtered",
            "failed",
            "in flight",
            "read ahead",
            "pending",
            "streams",
            "nodes",
            "done",
        ],
    )


class IterationPage(Page):
    """Progress of one iteration, read every ``period_ms`` while the page is open.

    ``throughput`` holds one point per change the server recorded: its clock ``time`` and
    the samples completed per second over the last ``window`` seconds of work.
    """

    iteration_id = param.String(default="", doc="The iteration shown.")
    progress = param.ClassSelector(class_=IterationProgress, default=None, doc="Last read.")
    dataset = param.ClassSelector(class_=Dataset, default=None, doc="Its dataset, by name.")
    inflight = param.DataFrame(default=None, doc="One row per rank holding samples.")
    ranks = param.DataFrame(default=None, doc="One row per rank: the loop's view.")
    sources = param.DataFrame(default=None, doc="A mixture's sources (None: not a mixture).")
    schedule = param.DataFrame(default=None, doc="A mixture's weight changes, oldest first.")
    throughput = param.DataFrame(default=None, doc="Columns time, samples_per_s.")
    locations = param.Dict(default={}, doc="The servers' locations by node id.")
    period_ms = param.Integer(default=500, bounds=(50, None), doc="How often to poll.")
    history = param.Integer(default=600, bounds=(2, None), doc="Throughput points kept.")
    window = param.Number(default=5.0, bounds=(0.1, None), doc="Seconds each rate spans.")
    clock = param.Callable(default=time.monotonic, doc="The page's seconds (tests fake it).")

    back = ("iterations", "All iterations")

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
        self._ranks = pn.pane.HTML("", stylesheets=css, sizing_mode="stretch_width")
        self._inflight = pn.pane.HTML("", stylesheets=css, sizing_mode="stretch_width")
        self._mixture = pn.pane.HTML("", stylesheets=css, sizing_mode="stretch_width")
        self._names: dict[str, str] = {}
        self._rate_note = pn.pane.HTML("", stylesheets=css, sizing_mode="stretch_width")
        self._source = ColumnDataSource(data={"time": [], "samples_per_s": []})
        self._y = Range1d(start=0, end=1)
        chart = figure(
            height=260,
            sizing_mode="stretch_width",
            x_axis_type="datetime",
            x_axis_label="clock time",
            y_axis_label="samples/s",
            y_range=self._y,
            tools="",
            toolbar_location=None,
        )
        chart.xaxis.formatter = DatetimeTickFormatter(
            seconds="%H:%M:%S", minsec="%H:%M:%S", minutes="%H:%M", hourmin="%H:%M"
        )
        chart.line("time", "samples_per_s", source=self._source, line_width=2, color="#5b3a99")
        self._chart = pn.pane.Bokeh(chart, sizing_mode="stretch_width", visible=False)
        # the chart joins the page with its first point: hidden, it still left an empty frame
        self._chart_box = pn.Column(sizing_mode="stretch_width")
        self._pushback = pn.widgets.Button(label="Pushback", color="warning", disabled=True)
        self._pushback.on_click(self._on_pushback)
        self.remover = ConfirmDelete(
            client=self.client,
            label="Delete iteration",
            describe=self.describe_delete,
            delete=self.delete,
            disabled=True,
        )
        self.remover.param.watch(self._on_deleted, "deleted")
        self._rates = Throughput(self.window)
        self._points: list[tuple[float, float]] = []
        self._poll: Any = None
        self._nodes_read: float | None = None
        self._gone = False
        self.refresh()

    # -- reading -------------------------------------------------------------------------

    def refresh(self, now: float | None = None) -> None:
        """Read the progress; add a throughput point when the server recorded a change.

        Args:
            now: The page's time of this read in seconds (default: ``clock()``).
        """
        if self._gone:
            return
        now = self.clock() if now is None else now
        progress: IterationProgress | None = None
        try:
            progress = self.connection.get_iteration(self.iteration_id)
        except IterationNotFound as exc:
            self.error, self.found = f"IterationNotFound: {exc}", False
            return
        except Exception as exc:  # the server is away, a bad id: said, the page stays
            self.error = describe_error(exc)
            return
        self.error, self.found = "", True
        if self.dataset is None or self.dataset.id != progress.dataset_id:
            try:
                self.dataset = self.connection.get_dataset(dataset_id=progress.dataset_id)
            except Exception:  # deleted meanwhile: the id is shown instead
                self.dataset = None
        self._learn_nodes(progress)
        points = self._rates.observe(progress.updated_at, progress.completed, now)
        if points:
            self._points = [*self._points, *points][-self.history :]
            self._source.stream(
                {
                    "time": [chart_ms(t) for t, _ in points],
                    "samples_per_s": [round(r, 3) for _, r in points],
                },
                rollover=self.history,
            )
            self._y.end = max(1.0, 1.15 * max(r for _, r in self._points))
            self.throughput = pd.DataFrame(
                [(t, round(r, 3)) for t, r in self._points], columns=["time", "samples_per_s"]
            )
        self.inflight = inflight_frame(progress)
        self.ranks = ranks_frame(progress, self.locations)
        if progress.mixture is not None:
            self._learn_names([s.dataset_id for s in progress.mixture.sources])
            self.sources = sources_frame(progress.mixture, self._names)
            self.schedule = schedule_frame(progress.mixture, self._names)
        self.progress = progress

    def _learn_nodes(self, progress: IterationProgress) -> None:
        """Read the servers' locations when a rank names one not known (not too often)."""
        named = {n for r in progress.ranks for n in r.nodes}
        if not named - set(self.locations):
            return
        now = time.monotonic()
        if self._nodes_read is not None and now - self._nodes_read < NODES_EVERY:
            return
        self._nodes_read = now
        try:
            self.locations = {n.id: n.location for n in self.connection.list_nodes()}
        except ActionNotFound:
            self._nodes_read = float("inf")  # an older server: node ids it is
        except Exception:  # shown by id until the next try
            pass

    def _learn_names(self, dataset_ids: list[str]) -> None:
        """The names of a mixture's source datasets, read once (a deleted one keeps its id)."""
        for dataset_id in dataset_ids:
            if dataset_id in self._names:
                continue
            try:
                self._names[dataset_id] = self.connection.get_dataset(dataset_id=dataset_id).name
            except Exception:  # gone, or the server is away: shown by id
                self._names[dataset_id] = dataset_id

    # -- actions -------------------------------------------------------------------------

    def _on_pushback(self, _event: object) -> None:
        self.pushback()

    def pushback(self) -> int | None:
        """Return every in-flight sample to the queue; say how many."""
        if self.progress is None or self.progress.done:
            return None
        count: int | None = None
        with self.calling():
            count = self.connection.pushback(self.iteration_id)
        if count is None:
            self.message = ""
            return None
        self.message = f"Pushed back {count} in-flight samples: they return to the queue."
        self.refresh()
        return count

    def describe_delete(self) -> Doomed:
        """What deleting this iteration takes away."""
        p = self.progress
        assert p is not None
        name = self.dataset.name if self.dataset is not None else p.dataset_id
        streams = sum(r.streams for r in p.ranks)
        return Doomed(
            what=f"iteration {p.id}",
            consequences=(
                f"Its progress ({p.completed} of {p.total} samples completed in epoch "
                f"{p.epoch}) is forgotten; a job that resumes it by id starts over. Dataset "
                f"{name!r} and its shard files stay."
            ),
            live=f"{streams} open stream{'s' if streams > 1 else ''}" if streams else "",
        )

    def delete(self, force: bool) -> str:
        """Delete this iteration (ending its streams first when ``force``)."""
        self.connection.delete_iteration(self.iteration_id, force=force)
        return f"Deleted iteration {self.iteration_id}."

    def _on_deleted(self, event: Any) -> None:
        if not event.new:
            return
        self._gone = True
        self.stop_polling()
        self.message, self.remover.message = self.remover.message, ""
        self.found = False

    def start_polling(self) -> None:
        """Poll every ``period_ms`` in the browser session (stops when the session ends)."""
        if self._poll is None:
            self._poll = pn.state.add_periodic_callback(self.refresh, period=self.period_ms)

    def stop_polling(self) -> None:
        """Stop polling."""
        if self._poll is not None:
            self._poll.stop()
            self._poll = None

    # -- showing -------------------------------------------------------------------------

    @param.depends("found", watch=True)
    def _found_changed(self) -> None:
        self._pushback.disabled = not self.found or self.progress is None or self.progress.done
        self.remover.disabled = not self.found

    def _dataset_html(self, p: IterationProgress) -> str:
        if p.mixture is not None:  # its sources are listed below
            return f"a mixture of {len(p.mixture.sources)} datasets"
        if self.dataset is None:
            return f"<code>{html.escape(p.dataset_id)}</code>"
        return link("dataset", self.dataset.name, id=self.dataset.id)

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
        limits = [r.read_ahead_limit for r in p.ranks if r.read_ahead_limit is not None]
        limit = f" (limit {sum(limits)})" if limits else ""
        if not spec.shuffle:
            shuffle = "no"
        elif spec.shuffle_seed is None:
            shuffle = f"yes (seed {p.seed}, chosen by the server)"
        else:
            shuffle = f"yes (seed {p.seed})"
        epochs = f"{spec.epochs} in all" if spec.epochs is not None else "no limit"
        self._summary.object = (
            f'<p id="iteration-summary">{"" if p.mixture else "dataset "}{self._dataset_html(p)}'
            f' · epoch <b id="lf-epoch">{p.epoch}</b> ({epochs}, from 0)'
            f" · batch size {spec.batch_size} · shuffle "
            f'<span id="lf-shuffle">{html.escape(shuffle)}</span> · world size '
            f"{spec.world_size} · created {format_time(p.created_at)} · updated "
            f'{format_time(p.updated_at)} · <b id="lf-state">{"done" if p.done else "running"}'
            "</b></p>"
            f'<p>in flight (the loop took them, not completed yet): <b id="lf-inflight">{held}'
            f"</b> samples · read ahead by the server: "
            f'<b id="lf-read-ahead">{p.read_ahead}</b>{limit}'
            f" · pending again: {sum(r.pending for r in p.ranks)}</p>"
        )
        self._ranks.object = html_table(
            self.ranks, "ranks-table", empty="No rank has started.", numeric=["read ahead"]
        )
        self._inflight.object = html_table(
            self.inflight, "inflight-table", empty="Nothing in flight."
        )
        if p.mixture is not None:
            self._mixture.object = (
                f"<h3>Mixture</h3><p>when a source runs out: <b>{p.mixture.on_exhausted}</b>"
                " · drawn: its samples the loops reached this epoch; finished: of those, "
                "completed</p>"
                + html_table(self.sources, "sources-table", numeric=["weight"])
                + "<h4>Weights over time</h4><p>each row holds from that sample of its epoch"
                " on (a resume replays the same order)</p>"
                + html_table(self.schedule, "schedule-table", numeric=["from sample"])
            )
        self._pushback.disabled = p.done or not self.found
        self.remover.disabled = not self.found
        if self._points:
            self._rate_note.object = ""
            self._chart.visible = True
            if not self._chart_box.objects:
                self._chart_box.objects = [self._chart]
        else:
            self._rate_note.object = (
                '<p class="lf-empty" id="throughput-empty">'
                + (
                    "Finished: no work while this page is open."
                    if p.done
                    else "Waiting for the loop's next reports."
                )
                + "</p>"
            )
            self._chart.visible = False
            self._chart_box.objects = []

    def __panel__(self) -> pn.viewable.Viewable:
        rows = [pn.Row(self._labels[name], self.bars[name]) for name in BARS]
        return self.layout(
            f"Iteration {self.iteration_id}",
            self._summary,
            *rows,
            pn.pane.HTML("<h3>Ranks</h3>"),
            self._ranks,
            self._mixture,
            pn.pane.HTML("<h3>In flight</h3>"),
            pn.Row(self._pushback),
            self._inflight,
            pn.pane.HTML("<h3>Throughput (samples/s)</h3>"),
            self._rate_note,
            self._chart_box,
            pn.pane.HTML("<h3>Delete</h3>"),
            self.remover,
        )
