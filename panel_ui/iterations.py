"""Iterations as a table: filtered (dataset, running/done) and paged by the server; delete.

:class:`IterationsTable` is the table with its filters, pages and a delete of the selected
iterations; the dataset page holds one for its dataset, the iterations page
(:class:`IterationsPage`, ``/iterations``) one for all datasets with a dataset filter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import panel as pn
import param

from ..protocol.errors import IterationBusy
from ..protocol.iterations import IterationProgress
from .common import TABLE_CSS, Page, format_time, html_table, link
from .deletion import ConfirmDelete, Doomed

__all__ = ["PAGE_SIZES", "STATES", "IterationsPage", "IterationsTable", "iterations_frame"]

PAGE_SIZES = [10, 25, 50, 100]
STATES = ["all", "running", "done"]
"""The state filter: every iteration, the running ones (not done), the done ones."""

COLUMNS = [
    "id",
    "dataset",
    "epoch",
    "total",
    "current",
    "completed",
    "filtered",
    "failed",
    "in flight",
    "read ahead",
    "done",
    "created",
]


def streams_of(progress: IterationProgress) -> int:
    """Streams open on the iteration now (known when its ranks were asked for)."""
    return sum(r.streams for r in progress.ranks)


def iterations_frame(
    iterations: list[IterationProgress], names: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """One row per iteration: id, dataset (by name), epoch, counts, in flight, done, created.

    "in flight" is what the loops took and did not complete; "read ahead" what the server
    sent ahead of them (both known when the ranks were asked for).
    """
    names = names or {}
    return pd.DataFrame(
        [
            {
                "id": it.id,
                "dataset": names.get(it.dataset_id, it.dataset_id),
                "dataset_id": it.dataset_id,
                "epoch": it.epoch,
                "total": it.total,
                "current": it.current,
                "completed": it.completed,
                "filtered": it.filtered,
                "failed": it.failed,
                "in flight": sum(r.inflight for r in it.ranks),
                "read ahead": it.read_ahead,
                "done": "yes" if it.done else "no",
                "created": format_time(it.created_at),
            }
            for it in iterations
        ],
        columns=[*COLUMNS[:2], "dataset_id", *COLUMNS[2:]],
    )


def _iteration_link(row: Mapping[str, Any]) -> str:
    return link("iteration", str(row["id"]), id=str(row["id"]))


class IterationsTable(Page):
    """Iterations, newest first: filters, pages of ``limit``, and delete of the selected.

    The server filters and pages (``list_iterations`` with ``state``, ``offset`` and
    ``limit``); one more than a page is asked for, to know whether a next page exists.
    """

    dataset_id = param.String(default="", doc="Only this dataset's (empty: every dataset's).")
    show_dataset = param.Boolean(default=True, doc="Whether the table names each dataset.")
    state: param.Selector = param.Selector(
        default="all",
        objects=STATES,
        doc="Which iterations to show: all, the running ones or the done ones.",
    )
    offset = param.Integer(default=0, bounds=(0, None), doc="First iteration of the page.")
    limit: param.Selector = param.Selector(default=10, objects=PAGE_SIZES, doc="Per page.")
    rows = param.DataFrame(default=None, doc="The page's iterations.")
    has_more = param.Boolean(default=False, doc="Whether a next page exists.")
    dataset_names = param.Dict(default={}, doc="Dataset names by id, to show and link.")
    selected = param.ListSelector(default=[], objects=[], doc="Iterations to delete.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._streams: dict[str, int] = {}
        self._table = pn.pane.HTML("", stylesheets=[TABLE_CSS], sizing_mode="stretch_width")
        self._where = pn.pane.HTML("", stylesheets=[TABLE_CSS])
        # newest first: the next page holds older ones (and the names differ from the
        # preview's Previous/Next on the dataset page)
        self._previous = pn.widgets.Button(label="◀ Newer")
        self._next = pn.widgets.Button(label="Older ▶")
        self._previous.on_click(lambda _: self.previous_page())
        self._next.on_click(lambda _: self.next_page())
        self.remover = ConfirmDelete(
            client=self.client,
            label="Delete selected iterations",
            describe=self.describe_selected,
            delete=self.delete_selected,
            disabled=True,
        )
        self.remover.param.watch(lambda _: self.refresh(), "deleted")
        self.refresh()

    # -- reading -------------------------------------------------------------------------

    @param.depends("dataset_id", "state", "limit", watch=True)
    def _filters_changed(self) -> None:
        if self.offset:
            self.offset = 0  # the watcher below reads the first page
        else:
            self.refresh()

    @param.depends("offset", watch=True)
    def refresh(self) -> None:
        """Read the current page from the server."""
        limit = int(self.limit)
        found: list[IterationProgress] | None = None
        with self.calling():
            found = self.connection.list_iterations(
                self.dataset_id or None,
                state=None if self.state == "all" else self.state,
                offset=self.offset,
                limit=limit + 1,
                ranks=True,
            )
        if found is None:
            return
        if not found and self.offset:  # the page emptied (deleted): back to the one before
            self.offset = max(0, self.offset - limit)
            return
        shown = found[:limit]
        self._streams = {it.id: streams_of(it) for it in shown}
        ids = [it.id for it in shown]
        self.param.selected.objects = ids
        self.selected = [i for i in self.selected if i in ids]
        self.has_more = len(found) > limit
        self.rows = iterations_frame(shown, self.dataset_names)

    def next_page(self) -> None:
        """Show the next page, if there is one."""
        if self.has_more:
            self.offset += int(self.limit)

    def previous_page(self) -> None:
        """Show the previous page."""
        self.offset = max(0, self.offset - int(self.limit))

    # -- deleting ------------------------------------------------------------------------

    def describe_selected(self) -> Doomed:
        """What deleting the selected iterations takes away (named in the table's order)."""
        ids = [i for i in self.param.selected.objects if i in self.selected]
        live = [
            f"{i} ({n} open stream{'s' if n > 1 else ''})"
            for i in ids
            if (n := self._streams.get(i, 0))
        ]
        many = len(ids) > 1
        return Doomed(
            what=f"{len(ids)} iterations: {', '.join(ids)}" if many else f"iteration {ids[0]}",
            consequences=(
                f"{'Their' if many else 'Its'} progress (what each rank took, completed, "
                "filtered and failed) is forgotten; a job that resumes "
                f"{'one' if many else 'it'} by id starts over. The datasets and their shard "
                "files stay."
            ),
            live=", ".join(live),
        )

    def delete_selected(self, force: bool) -> str:
        """Delete the selected iterations; the live ones only with ``force``."""
        deleted: list[str] = []
        refused: list[str] = []
        for iteration_id in [i for i in self.param.selected.objects if i in self.selected]:
            try:
                self.connection.delete_iteration(iteration_id, force=force)
            except IterationBusy:
                refused.append(iteration_id)
                continue
            deleted.append(iteration_id)
        if refused:
            self.refresh()
            self.selected = [i for i in refused if i in self.param.selected.objects]
            done = f"Deleted {', '.join(deleted)}. " if deleted else ""
            live = ", ".join(
                f"{i} ({self._streams.get(i, 0) or 'some'} open streams)" for i in refused
            )
            raise IterationBusy(
                f"{done}Live: {live}: stop the jobs that read them, or tick the box below "
                "to end them first (their readers get IterationNotFound)"
            )
        return f"Deleted {len(deleted)} iteration{'s' if len(deleted) > 1 else ''}: " + (
            ", ".join(deleted)
        )

    # -- showing -------------------------------------------------------------------------

    @param.depends("selected", watch=True)
    def _selection_changed(self) -> None:
        self.remover.disabled = not self.selected
        if not self.selected:
            self.remover.cancel()

    @param.depends("rows", "has_more", "dataset_names", "show_dataset", watch=True)
    def _render(self) -> None:
        frame = self.rows
        if frame is not None:
            drop = ["dataset_id"] + ([] if self.show_dataset else ["dataset"])
            shown = frame.drop(columns=drop)
        else:
            shown = None
        links = {"id": _iteration_link}
        if self.show_dataset and frame is not None:
            dataset_of = dict(zip(frame["id"], frame["dataset_id"], strict=True))
            links["dataset"] = lambda row: link(
                "dataset", str(row["dataset"]), id=str(dataset_of[row["id"]])
            )
        empty = "No iterations yet." if self.state == "all" else f"No {self.state} iterations."
        self._table.object = html_table(shown, "iterations-table", links=links, empty=empty)
        count = 0 if frame is None else len(frame)
        first = self.offset + 1 if count else 0
        # an empty page says so in the table's place: no "iterations 0-0"
        self._where.object = (
            f'<span id="iterations-rows">iterations {first}-{self.offset + count}'
            f"{' (more on the next page)' if self.has_more else ''}</span>"
            if count
            else ""
        )
        self._previous.disabled = self.offset == 0
        self._next.disabled = not self.has_more

    def __panel__(self) -> pn.viewable.Viewable:
        self._render()
        return pn.Column(
            pn.Row(
                pn.widgets.RadioButtonGroup.from_param(
                    self.param.state, name="state", color="primary", variant="outline"
                ),
                pn.widgets.Select.from_param(self.param.limit, name="per page", width=100),
                self._previous,
                self._next,
                self._where,
            ),
            self._alerts,
            self._table,
            pn.widgets.CheckBoxGroup.from_param(
                self.param.selected, name="Select to delete", inline=True
            ),
            self.remover,
            sizing_mode="stretch_width",
        )


class IterationsPage(Page):
    """``/iterations``: every iteration, filtered by dataset and by state, newest first, paged."""

    dataset_id = param.String(default="", doc="The dataset filter (empty: all datasets).")
    datasets = param.Dict(default={}, doc="Dataset ids by name, for the filter.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        names: dict[str, str] = {}
        with self.calling():
            names = {d.id: d.name for d in self.connection.list_datasets()}
        self.datasets = {"all datasets": "", **{name: i for i, name in names.items()}}
        known = self.dataset_id in names
        self._choice = pn.widgets.Select(
            label="dataset",
            options=self.datasets,
            value=self.dataset_id if known else "",
            width=260,
        )
        self.table = IterationsTable(
            client=self.client,
            dataset_id=self.dataset_id if known else "",
            dataset_names=names,
        )
        if self.dataset_id and not known and not self.error:
            self.error = f"DatasetNotFound: no dataset with id {self.dataset_id!r}: all shown"
        self._choice.param.watch(self._on_choice, "value")

    def _on_choice(self, event: Any) -> None:
        self.pick(str(event.new or ""))

    def pick(self, dataset_id: str) -> None:
        """Show one dataset's iterations (empty: every dataset's)."""
        self.dataset_id = dataset_id
        self._choice.value = dataset_id
        self.table.dataset_id = dataset_id

    def __panel__(self) -> pn.viewable.Viewable:
        return self.layout("Iterations", self._choice, self.table)
