"""The datasets list (with its create form) and a dataset's page (shardsets, preview, runs)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import pandas as pd
import panel as pn
import param

from ..protocol import Dataset
from .common import TABLE_CSS, Page, arrow_frame, format_bytes, format_time, html_table, link
from .deletion import ConfirmDelete, Doomed
from .iterations import IterationsTable, iterations_frame, streams_of
from .shardsets import AddShardsetForm

__all__ = ["DatasetPage", "DatasetsPage", "iterations_frame"]

PAGE_SIZES = [10, 25, 50, 100]


def _dataset_link(row: Mapping[str, Any]) -> str:
    return link("dataset", str(row["name"]), id=str(row["id"]))


class DatasetsPage(Page):
    """Every dataset (name, id, shardsets, samples, created) and a form to create one."""

    datasets = param.DataFrame(default=None, doc="One row per dataset.")
    new_name = param.String(default="", doc="Name of the dataset to create.")
    new_uid_column = param.String(default="uid", doc="Its uid column.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._table = pn.pane.HTML("", stylesheets=[TABLE_CSS], sizing_mode="stretch_width")
        self._create = pn.widgets.Button(label="Create dataset", color="primary")
        self._create.on_click(self._on_create)
        self.refresh()
        self._render()

    def refresh(self) -> None:
        """Read the datasets from the server."""
        with self.calling():
            found = self.connection.list_datasets()
            self.datasets = pd.DataFrame(
                [
                    {
                        "name": d.name,
                        "id": d.id,
                        "shardsets": len(d.shardsets),
                        "samples": d.total_samples,
                        "created": format_time(d.created_at),
                    }
                    for d in found
                ],
                columns=["name", "id", "shardsets", "samples", "created"],
            )

    def _on_create(self, _event: object) -> None:
        self.create()

    def create(self) -> Dataset | None:
        """Create the dataset the form describes; the list then shows it."""
        name, uid = self.new_name.strip(), self.new_uid_column.strip() or "uid"
        if not name:
            self.message, self.error = "", "InvalidArgument: a dataset needs a name"
            return None
        created: Dataset | None = None
        with self.calling():
            created = self.connection.create_dataset(name, uid)
        if created is None:
            self.message = ""
            return None
        self.message = f"Created dataset {created.name!r} ({created.id})"
        self.new_name = ""
        self.refresh()
        return created

    @param.depends("datasets", watch=True)
    def _render(self) -> None:
        self._table.object = html_table(
            self.datasets,
            "datasets-table",
            links={"name": _dataset_link},
            empty="No datasets yet: create one below.",
        )

    def __panel__(self) -> pn.viewable.Viewable:
        return self.layout(
            "Datasets",
            self._table,
            pn.pane.HTML("<h3>Create a dataset</h3>"),
            pn.Row(
                pn.widgets.TextInput.from_param(
                    self.param.new_name, label="Name", placeholder="my-dataset"
                ),
                pn.widgets.TextInput.from_param(self.param.new_uid_column, label="uid column"),
                pn.Column(pn.Spacer(height=18), self._create),
            ),
        )


class DatasetPage(Page):
    """One dataset: its shardsets, a paged preview of the joined rows, its iterations.

    The iterations table is filtered, paged and deleted from like the iterations page's
    (``iterations_table``); *Delete dataset* asks first, naming what goes.
    """

    dataset_id = param.String(default="", doc="The dataset shown.")
    dataset = param.ClassSelector(class_=Dataset, default=None, doc="The dataset, as read.")
    shardsets = param.DataFrame(default=None, doc="One row per shardset.")
    preview = param.DataFrame(default=None, doc="The rows of the current preview page.")
    preview_columns = param.ListSelector(default=[], objects=[], doc="Columns to preview.")
    offset = param.Integer(default=0, bounds=(0, None), doc="First row of the preview page.")
    limit: param.Selector = param.Selector(
        default=10, objects=PAGE_SIZES, doc="Rows per preview page."
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        css = [TABLE_CSS]
        self._summary = pn.pane.HTML("", stylesheets=css, sizing_mode="stretch_width")
        self._shardsets = pn.pane.HTML("", stylesheets=css, sizing_mode="stretch_width")
        self._preview = pn.pane.HTML("", stylesheets=css, sizing_mode="stretch_width")
        self._rows = pn.pane.HTML("", stylesheets=css)
        self._numeric: list[str] = []
        self._previous = pn.widgets.Button(label="Previous")
        self._next = pn.widgets.Button(label="Next")
        self._previous.on_click(lambda _: self.previous_page())
        self._next.on_click(lambda _: self.next_page())
        self.add_shardset = AddShardsetForm(client=self.client, dataset_id=self.dataset_id)
        self.add_shardset.param.watch(lambda _: self.refresh(), "created")
        self.iterations_table = IterationsTable(
            client=self.client, dataset_id=self.dataset_id, show_dataset=False
        )
        self.remover = ConfirmDelete(
            client=self.client,
            label="Delete dataset",
            describe=self.describe_delete,
            delete=self.delete,
            disabled=True,
        )
        self.remover.param.watch(self._on_deleted, "deleted")
        self.refresh()

    @property
    def total(self) -> int:
        """Samples of the dataset (rows of its main shardset)."""
        return self.dataset.total_samples if self.dataset is not None else 0

    @property
    def iterations(self) -> pd.DataFrame | None:
        """The rows of the iterations table's current page."""
        rows: pd.DataFrame | None = self.iterations_table.rows
        return rows

    def refresh(self) -> None:
        """Read the dataset and its iterations, then the preview page."""
        picked: list[str] | None = None
        dataset: Dataset | None = None
        with self.calling():
            dataset = self.connection.get_dataset(dataset_id=self.dataset_id)
        if dataset is None:
            self.found = self.dataset is not None and not self.error.startswith("DatasetNotFound")
            self.remover.disabled = not self.found
            return
        uid = dataset.uid_column_name
        names = list(
            dict.fromkeys(c.name for s in dataset.shardsets for c in s.columns if c.name != uid)
        )
        self.shardsets = pd.DataFrame(
            [
                {
                    "id": s.id,
                    "location": s.location,
                    "main": "yes" if s.is_main else "",
                    "columns": ", ".join(f"{c.name}: {c.type_}" for c in s.columns),
                    "shards": s.shard_count,
                    "samples": s.total_samples,
                    "size": format_bytes(s.total_bytes),
                }
                for s in dataset.shardsets
            ],
            columns=["id", "location", "main", "columns", "shards", "samples", "size"],
        )
        self.iterations_table.refresh()
        # New columns start picked; the ones the user already saw keep their choice.
        known = self.param.preview_columns.objects
        picked = [c for c in names if c in self.preview_columns or c not in known]
        self.param.preview_columns.objects = names
        self.dataset = dataset
        self.found = True
        self.remover.disabled = False
        if picked != list(self.preview_columns):
            self.preview_columns = picked  # the watcher loads the preview
        else:
            self.load_preview()

    @param.depends("preview_columns", "offset", "limit", watch=True)
    def load_preview(self) -> None:
        """Read the current preview page (uid column always included)."""
        if self.dataset is None:
            return
        if self.dataset.main_shardset is None:  # nothing to read yet (the page says so)
            self.preview = pd.DataFrame()
            return
        with self.calling():
            table = self.connection.preview_dataset(
                self.dataset.id,
                offset=self.offset,
                limit=int(self.limit),
                columns=list(self.preview_columns),
            )
            frame, self._numeric = arrow_frame(table)
            self.preview = frame

    def next_page(self) -> None:
        """Show the next page of rows, if there is one."""
        if self.offset + int(self.limit) < self.total:
            self.offset += int(self.limit)

    def previous_page(self) -> None:
        """Show the previous page of rows."""
        self.offset = max(0, self.offset - int(self.limit))

    # -- deleting ------------------------------------------------------------------------

    def describe_delete(self) -> Doomed:
        """What deleting the dataset takes away (and its live iterations, if any)."""
        dataset = self.dataset
        assert dataset is not None
        running = self.connection.list_iterations(dataset.id, state="running", ranks=True)
        live = [
            f"{it.id} ({n} open stream{'s' if n > 1 else ''})"
            for it in running
            if (n := streams_of(it))
        ]
        count = len(dataset.shardsets)
        return Doomed(
            what=f"dataset {dataset.name!r} ({dataset.id})",
            consequences=(
                f"Its {count} shardset{'s' if count != 1 else ''} ({dataset.total_samples} "
                "samples) and all its iterations, with their progress, leave the catalog; the "
                "shard files stay in storage."
            ),
            live=", ".join(live),
        )

    def delete(self, force: bool) -> str:
        """Delete the dataset (ending its live iterations first when ``force``)."""
        dataset = self.dataset
        assert dataset is not None
        self.connection.delete_dataset(dataset.id, force=force)
        return f"Deleted dataset {dataset.name!r} ({dataset.id}); its shard files stay."

    def _on_deleted(self, event: Any) -> None:
        if event.new:
            self.message, self.remover.message = self.remover.message, ""
            self.found = False

    # -- showing -------------------------------------------------------------------------

    @param.depends("dataset", "shardsets", watch=True)
    def _render(self) -> None:
        dataset = self.dataset
        if dataset is None:
            self._summary.object = ""
            return
        self._summary.object = (
            f'<p id="dataset-summary">id <code>{dataset.id}</code> · uid column '
            f"<code>{html.escape(dataset.uid_column_name)}</code> · {dataset.total_samples} "
            f"samples · created {format_time(dataset.created_at)}</p>"
        )
        self._shardsets.object = html_table(
            self.shardsets,
            "shardsets-table",
            links={
                "id": lambda row: link(
                    "shardset", str(row["id"]), dataset=dataset.id, id=str(row["id"])
                )
            },
            empty="No shardsets yet: add one below.",
        )

    @param.depends("preview", watch=True)
    def _render_preview(self) -> None:
        shown = 0 if self.preview is None else len(self.preview)
        first = self.offset + 1 if shown else 0
        self._rows.object = (
            f'<span id="preview-rows">rows {first}-{self.offset + shown} of {self.total}</span>'
        )
        self._preview.object = html_table(
            self.preview, "preview-table", empty="No rows.", numeric=self._numeric
        )
        self._previous.disabled = self.offset == 0
        self._next.disabled = self.offset + int(self.limit) >= self.total

    def __panel__(self) -> pn.viewable.Viewable:
        name = self.dataset.name if self.dataset is not None else self.dataset_id
        return self.layout(
            f"Dataset {name}",
            self._summary,
            pn.pane.HTML("<h3>Shardsets</h3>"),
            self._shardsets,
            pn.pane.HTML("<h3>Preview</h3>"),
            pn.widgets.CheckBoxGroup.from_param(self.param.preview_columns, inline=True),
            pn.Row(
                self._previous,
                self._next,
                pn.widgets.Select.from_param(self.param.limit, label="rows per page", width=120),
                self._rows,
            ),
            self._preview,
            pn.pane.HTML("<h3>Iterations</h3>"),
            self.iterations_table,
            pn.pane.HTML("<h3>Add a shardset</h3>"),
            self.add_shardset,
            pn.pane.HTML("<h3>Delete</h3>"),
            self.remover,
        )
