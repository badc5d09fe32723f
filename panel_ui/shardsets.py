"""Adding a shardset (columns inferred, then edited) and a shardset's page (shards, Sync)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import pandas as pd
import panel as pn
import param
from pydantic import ValidationError

from ..protocol import ColumnOptions, Dataset, Shard, Shardset, SyncResult, wire
from ..protocol.errors import ActionNotFound, InvalidArgument
from ..protocol.shards import aligned_partners
from .common import TABLE_CSS, Page, describe_error, format_bytes, format_time, html_table, link
from .deletion import ConfirmDelete, Doomed

__all__ = ["AddShardsetForm", "ShardsetPage", "columns_to_text", "for_the_form", "parse_columns"]

PYTHON_HINT = "pass columns=[...] or write a shard there first"
FORM_HINT = (
    "put shard files there first, or type the columns below ('name: type' lines) and "
    "Save: the shardset then waits for its files (Sync registers them)"
)


def for_the_form(message: str) -> str:
    """A server's message reworded for the web form (it speaks to Python users)."""
    return message.replace(PYTHON_HINT, FORM_HINT)


def columns_to_text(columns: Sequence[ColumnOptions]) -> str:
    """Columns as editable lines: ``name: type`` and an optional ``# description``."""
    return "\n".join(
        f"{c.name}: {c.type_}" + (f"  # {c.description}" if c.description else "") for c in columns
    )


def parse_columns(text: str) -> list[ColumnOptions]:
    """The columns of the lines ``name: type  # description`` (blank lines are skipped).

    Raises:
        InvalidArgument: a line is not ``name: type`` or its type is unknown; the message
            names the line.
    """
    columns = []
    for number, line in enumerate(text.splitlines(), start=1):
        spec, _, description = line.partition("#")
        if not spec.strip():
            continue
        name, colon, type_ = spec.partition(":")
        if not colon or not name.strip() or not type_.strip():
            raise InvalidArgument(f"column line {number}: write 'name: type', got {line.strip()!r}")
        try:
            columns.append(
                ColumnOptions(
                    name=name.strip(), type_=type_.strip(), description=description.strip()
                )
            )
        except ValidationError as exc:
            raise InvalidArgument(f"column line {number}: {wire.problems(exc)}") from None
    return columns


def _file_name(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def _uid_range(shard: Shard) -> str:
    if shard.uid_min is None and shard.uid_max is None:
        return ""
    return f"{shard.uid_min} - {shard.uid_max}"


class AddShardsetForm(Page):
    """Location and columns of a new shardset; "Infer columns" reads the first shard there.

    The columns are lines of ``name: type  # description`` the user can edit before Save.
    With no lines, the server infers them itself when saving.
    """

    dataset_id = param.String(default="", doc="The dataset to add the shardset to.")
    location = param.String(default="", doc="Folder URL of the shard files.")
    columns_text = param.String(default="", doc="The columns, one 'name: type' per line.")
    is_main = param.Boolean(default=False, doc="Whether it decides which samples exist.")
    created = param.ClassSelector(class_=Shardset, default=None, doc="The last one saved.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._infer = pn.widgets.Button(label="Infer columns")
        self._save = pn.widgets.Button(label="Save shardset", color="primary")
        self._infer.on_click(self._on_infer)
        self._save.on_click(self._on_save)
        self._created = pn.pane.HTML("", stylesheets=[TABLE_CSS])

    def _on_infer(self, _event: object) -> None:
        self.infer()

    def _on_save(self, _event: object) -> None:
        self.save()

    def infer(self) -> list[ColumnOptions] | None:
        """Fill the columns from the first shard file found at the location."""
        self.message = ""
        location = self.location.strip()
        if not location:
            self.error = "InvalidArgument: type the location first (a folder URL)"
            return None
        try:
            found = self.connection.infer_columns(location)
        except ActionNotFound:
            self.error = (
                "This server cannot infer columns (it has no 'infer_columns' action): "
                "type them in as 'name: type' lines."
            )
            return None
        except Exception as exc:
            self.error = for_the_form(describe_error(exc))
            return None
        self.error = ""
        self.columns_text = columns_to_text(found)
        self.message = f"Found {len(found)} columns in the first shard: edit them, then Save."
        return found

    def save(self) -> Shardset | None:
        """Create the shardset with the edited columns (inferred by the server when empty)."""
        self.message = ""
        created: Shardset | None = None
        with self.calling():
            columns = parse_columns(self.columns_text)
            created = self.connection.create_shardset(
                self.dataset_id,
                self.location.strip(),
                columns or None,
                self.is_main,
            )
        if created is None:
            return None
        self.message = (
            f"Created shardset {created.id}: {created.shard_count} shards, "
            f"{created.total_samples} samples"
        )
        self._created.object = link(
            "shardset", f"Open shardset {created.id}", dataset=created.dataset_id, id=created.id
        )
        self.created = created
        self.location, self.columns_text = "", ""
        return created

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            self._alerts,
            pn.widgets.TextInput.from_param(
                self.param.location,
                label="Location",
                placeholder="file:///data/my_shards or s3://bucket/prefix",
                sizing_mode="stretch_width",
            ),
            self._infer,
            pn.widgets.TextAreaInput.from_param(
                self.param.columns_text,
                label="Columns (one 'name: type  # description' per line)",
                placeholder="uid: int64\ntext: string  # the caption",
                height=160,
                sizing_mode="stretch_width",
            ),
            pn.widgets.Checkbox.from_param(self.param.is_main, label="main shardset"),
            self._save,
            self._created,
            sizing_mode="stretch_width",
        )


class ShardsetPage(Page):
    """One shardset: its columns and shards, a Sync button for new shard files, a delete."""

    dataset_id = param.String(default="", doc="The shardset's dataset.")
    shardset_id = param.String(default="", doc="The shardset shown.")
    shardset = param.ClassSelector(class_=Shardset, default=None, doc="The shardset, as read.")
    dataset = param.ClassSelector(class_=Dataset, default=None, doc="Its dataset, by name.")
    shards = param.DataFrame(default=None, doc="One row per shard file.")
    aligned = param.Integer(
        default=None, allow_None=True, doc="Shards aligned with a main shard (None: main)."
    )
    last_sync = param.ClassSelector(class_=SyncResult, default=None, doc="The last sync's result.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        css = [TABLE_CSS]
        self._summary = pn.pane.HTML("", stylesheets=css, sizing_mode="stretch_width")
        self._shards = pn.pane.HTML("", stylesheets=css, sizing_mode="stretch_width")
        self._sync = pn.widgets.Button(label="Sync", color="primary")
        self._sync.on_click(self._on_sync)
        self.remover = ConfirmDelete(
            client=self.client,
            label="Delete shardset",
            describe=self.describe_delete,
            delete=self.delete,
            disabled=True,
        )
        self.remover.param.watch(self._on_deleted, "deleted")
        self.refresh()
        self._render()

    def refresh(self) -> None:
        """Read the shardset, its shards and its dataset (for its name)."""
        read = False
        with self.calling():
            shardset = self.connection.get_shardset(self.dataset_id, self.shardset_id)
            shards = self.connection.list_shards(self.dataset_id, self.shardset_id)
            dataset = self.connection.get_dataset(dataset_id=self.dataset_id)
            partners: dict[int, int] | None = None
            if not shardset.is_main:
                main = dataset.main_shardset
                if main is not None:
                    main_shards = self.connection.list_shards(self.dataset_id, main.id)
                    partners = aligned_partners(shards, main_shards)
            self.shards = pd.DataFrame(
                [
                    {
                        "index": s.index,
                        "file": _file_name(s.location),
                        "format": s.format,
                        "rows": s.num_rows,
                        "size": format_bytes(s.size_bytes),
                        "uid range": _uid_range(s),
                        "joins": "main"
                        if partners is None
                        else f"aligned with main shard {partners[s.index]}"
                        if s.index in partners
                        else "by uid",
                    }
                    for s in shards
                ],
                columns=["index", "file", "format", "rows", "size", "uid range", "joins"],
            )
            self.aligned = None if partners is None else len(partners)
            self.dataset = dataset
            self.shardset = shardset
            read = True
        if not read and self.shardset is None:
            self.found = False
        self.remover.disabled = not self.found

    def _on_sync(self, _event: object) -> None:
        self.sync()

    def sync(self) -> SyncResult | None:
        """Register new shard files at the location; say what was found."""
        result: SyncResult | None = None
        with self.calling():
            result = self.connection.sync_shardset(self.dataset_id, self.shardset_id)
        if result is None:
            self.message = ""
            return None
        added = ", ".join(_file_name(s.location) for s in result.added)
        self.message = (
            f"Sync found {len(result.added)} new shard files"
            + (f" ({added})" if added else "")
            + f", {len(result.updated)} changed, {len(result.removed)} removed: "
            f"{result.shard_count} shards, {result.total_samples} samples"
        )
        self.last_sync = result
        self.refresh()
        return result

    # -- deleting ------------------------------------------------------------------------

    def describe_delete(self) -> Doomed:
        """What deleting the shardset takes away (and the live iterations reading it)."""
        s = self.shardset
        assert s is not None
        name = self.dataset.name if self.dataset is not None else s.dataset_id
        uid = self.dataset.uid_column_name if self.dataset is not None else ""
        columns = ", ".join(c.name for c in s.columns if c.name != uid) or "none"
        main = (
            " It is the main shardset: the next one becomes main and decides which samples exist."
            if s.is_main
            else ""
        )
        running = self.connection.list_iterations(s.dataset_id, state="running", ranks=True)
        live = [
            f"{it.id} ({n} open stream{'s' if n > 1 else ''})"
            for it in running
            if (n := sum(r.streams for r in it.ranks))
            and (s.is_main or it.spec.shardsets is None or s.id in it.spec.shardsets)
        ]
        return Doomed(
            what=f"shardset {s.id} of dataset {name!r}",
            consequences=(
                f"Its columns ({columns}) leave the dataset.{main} Its {s.shard_count} shard "
                f"files stay in storage at {s.location}."
            ),
            live=", ".join(live),
        )

    def delete(self, force: bool) -> str:
        """Delete the shardset (ending the live iterations reading it first when ``force``)."""
        self.connection.delete_shardset(self.dataset_id, self.shardset_id, force=force)
        return f"Deleted shardset {self.shardset_id}; its shard files stay."

    def _on_deleted(self, event: Any) -> None:
        if event.new:
            self.message, self.remover.message = self.remover.message, ""
            self.found = False

    # -- showing -------------------------------------------------------------------------

    @param.depends("shardset", "shards", "dataset", watch=True)
    def _render(self) -> None:
        s = self.shardset
        if s is None:
            self._summary.object = ""
            self._shards.object = ""
            return
        columns = "".join(
            f"<tr><td>{html.escape(c.name)}</td><td>{html.escape(c.type_)}</td>"
            f"<td>{html.escape(c.description)}</td></tr>"
            for c in s.columns
        )
        dataset = (
            link("dataset", self.dataset.name, id=s.dataset_id)
            if self.dataset is not None
            else f"<code>{html.escape(s.dataset_id)}</code>"
        )
        self._summary.object = (
            f'<p id="shardset-summary">dataset {dataset} · '
            f"location <code>{html.escape(s.location)}</code> · "
            f"{'main · ' if s.is_main else ''}{s.shard_count} shards · {s.total_samples} "
            f"samples · {format_bytes(s.total_bytes)} · created {format_time(s.created_at)}</p>"
            + (
                ""
                if self.aligned is None
                else f'<p id="shardset-joins">adds columns to the main shardset: '
                f"{self.aligned} of {s.shard_count} shards aligned with a main shard "
                "(attached as read); the rest join by uid through the index built at sync</p>"
            )
            + '<table class="lf-table" id="columns-table"><thead><tr><th>column</th><th>type</th>'
            f"<th>description</th></tr></thead><tbody>{columns}</tbody></table>"
        )
        self._shards.object = html_table(
            self.shards, "shards-table", empty="No shard files registered yet."
        )

    def __panel__(self) -> pn.viewable.Viewable:
        return self.layout(
            f"Shardset {self.shardset_id}",
            self._summary,
            pn.Row(self._sync),
            pn.pane.HTML("<h3>Shards</h3>"),
            self._shards,
            pn.pane.HTML("<h3>Delete</h3>"),
            self.remover,
        )
