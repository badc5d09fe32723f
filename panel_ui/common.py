"""What every page shares: the connection, a message line, errors shown as text, tables.

Tables are plain HTML built from the pages' DataFrame params (every value escaped), so a
page's state is testable without a browser and the browser needs nothing but Panel's own
bundled resources. A page whose subject is not there (a bad id, or deleted) shows its
header, the one-line error and a way back, and nothing else.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import panel as pn
import param
import pyarrow as pa
import pyarrow.compute as pc

from ..client.connection import LavenderClient
from ..protocol.errors import LavenderError, ServerUnavailable

__all__ = [
    "NAVIGATION",
    "TABLE_CSS",
    "Page",
    "arrow_frame",
    "describe_error",
    "format_ago",
    "format_bytes",
    "format_time",
    "html_table",
    "link",
    "navigation",
]

NAVIGATION = (
    ("datasets", "Datasets"),
    ("iterations", "Iterations"),
    ("nodes", "Nodes"),
    ("plugins", "Plugins"),
)
"""The pages every header links to: (path, label)."""

TABLE_CSS = """
table.lf-table { border-collapse: collapse; font-size: 14px; margin: 4px 0 12px 0; }
table.lf-table th, table.lf-table td {
  border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top;
}
table.lf-table th { background: #f3f0f8; }
table.lf-table td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.lf-empty { color: #666; font-style: italic; }
div.lf-alert { padding: 8px 12px; border-radius: 4px; margin: 4px 0; }
div.lf-error { background: #fbe3e4; color: #8a1f11; border: 1px solid #f1a9a0; }
div.lf-message { background: #e6f4ea; color: #1e4620; border: 1px solid #a8d5b5; }
div.lf-confirm { background: #fff8e1; border: 1px solid #e0c36a; padding: 8px 12px;
  border-radius: 4px; margin: 4px 0; }
div.lf-confirm p { margin: 4px 0; }
span.lf-live { color: #8a1f11; font-weight: bold; }
a { color: #5b3a99; }
"""


log = logging.getLogger(__name__)


def describe_error(exc: BaseException) -> str:
    """One line for a page: ``DatasetNotFound: no dataset named 'x'``, never a traceback.

    Errors that are not ours (a bug) are logged with their traceback on the server side.
    """
    if not isinstance(exc, LavenderError):
        log.error("dashboard call failed", exc_info=exc)
    text = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {text}"


def format_bytes(size: int | float) -> str:
    """A byte count for people: ``1.5 MB``."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def format_time(timestamp: float) -> str:
    """A UNIX time as local ``YYYY-MM-DD HH:MM:SS``."""
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def format_ago(timestamp: float, now: float | None = None) -> str:
    """How long ago a UNIX time was, for people: ``3 s ago``, ``5 min ago``, ``2 h ago``."""
    seconds = max(0.0, (time.time() if now is None else now) - timestamp)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


class _Float32(float):
    """A float32 inside a nested value, printed with float32's shortest digits."""

    def __repr__(self) -> str:
        return str(np.float32(self))

    __str__ = __repr__


def _has_short_float(type_: pa.DataType) -> bool:
    if pa.types.is_float32(type_) or pa.types.is_float16(type_):
        return True
    return any(_has_short_float(type_.field(i).type) for i in range(type_.num_fields))


def _short_floats(value: Any, type_: pa.DataType) -> Any:
    """A nested Python value with its float32 values as :class:`_Float32`."""
    if value is None:
        return None
    if pa.types.is_float32(type_) or pa.types.is_float16(type_):
        return _Float32(value)
    if pa.types.is_struct(type_):
        return {f.name: _short_floats(value.get(f.name), f.type) for f in type_}
    if pa.types.is_map(type_):
        return [(_short_floats(k, type_.key_type), _short_floats(v, type_.item_type))
                for k, v in value]  # fmt: skip
    if type_.num_fields == 1:  # the lists
        return [_short_floats(v, type_.value_type) for v in value]
    return value


def arrow_frame(table: pa.Table) -> tuple[pd.DataFrame, list[str]]:
    """A table as a DataFrame to show, and its numeric columns (to align right).

    float32 (and float16) values read as pyarrow prints them (``0.052231137``), not with the
    float64 digits of their Python value (``0.052231136709451675``).
    """
    columns: dict[str, list[Any]] = {}
    numeric = []
    for name, column in zip(table.column_names, table.columns, strict=True):
        type_ = column.type
        if pa.types.is_integer(type_) or pa.types.is_floating(type_):
            numeric.append(name)
        if pa.types.is_float32(type_) or pa.types.is_float16(type_):
            columns[name] = pc.cast(column, pa.string()).to_pylist()
        elif _has_short_float(type_):
            columns[name] = [_short_floats(v, type_) for v in column.to_pylist()]
        else:
            columns[name] = column.to_pylist()
    return pd.DataFrame(columns, columns=table.column_names), numeric


def link(page: str, text: str, **query: str) -> str:
    """An HTML link to another page of the dashboard (relative, so a prefix keeps working)."""
    href = f"{page}?{urlencode(query)}" if query else page
    return f'<a href="{html.escape(href)}">{html.escape(text)}</a>'


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, bytes):
        value = value[:64].hex() + ("..." if len(value) > 64 else "")
    text = str(value)
    return html.escape(text if len(text) <= 200 else text[:200] + "...")


def html_table(
    frame: pd.DataFrame | None,
    table_id: str,
    links: Mapping[str, Callable[[Mapping[str, Any]], str]] | None = None,
    empty: str = "nothing here yet",
    numeric: Collection[str] = (),
) -> str:
    """An HTML table of a DataFrame.

    ``links`` renders some columns as HTML of their row (links; the callables escape what
    they show); numbers, and the ``numeric`` columns, align right.
    """
    if frame is None or frame.empty:
        return f'<p class="lf-empty" id="{table_id}-empty">{html.escape(empty)}</p>'
    links = links or {}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for record in frame.to_dict("records"):
        cells = []
        for column, value in record.items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            right = column in numeric or is_number
            content = links[column](record) if column in links else _cell(value)
            cells.append(f'<td class="num">{content}</td>' if right else f"<td>{content}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<table class="lf-table" id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _logged_in() -> bool:
    """Whether this browser session logged in (the dashboard has a login)."""
    try:
        user = pn.state.user
    except Exception:  # outside a served session
        return False
    return user not in (None, "", "guest")


def navigation(title: str, logout: bool | None = None) -> pn.viewable.Viewable:
    """The header of every page: the product name, links to the lists, the page title.

    ``logout`` adds a *Log out* link (default: when this browser session logged in).
    """
    links = "".join(link(path, label) for path, label in NAVIGATION)
    if logout if logout is not None else _logged_in():
        links += '<span style="flex:1"></span><a id="lf-logout" href="logout">Log out</a>'
    return pn.pane.HTML(
        '<div style="display:flex;gap:18px;align-items:baseline">'
        f'<b style="color:#5b3a99;font-size:18px">Lavender Flight</b>{links}</div>'
        f'<h2 id="lf-title" style="margin:8px 0 4px 0">{html.escape(title)}</h2>',
        stylesheets=[TABLE_CSS],
        sizing_mode="stretch_width",
    )


class Page(pn.viewable.Viewer):
    """Base of the dashboard's pages: a connection, a message, an error line.

    Pages call the methods of their own :class:`LavenderClient` (``self.connection``), the
    dashboard's, never the module-level client a user's script in the same process may
    hold. Calls go through :meth:`calling`, which turns any failure into the ``error``
    param (``DatasetNotFound: no dataset ...``) instead of raising.

    ``found`` False (the page's subject could not be read, or was deleted) hides the
    page's body: only the header, the alerts and a link back (``back``) show.
    """

    client = param.ClassSelector(class_=LavenderClient, doc="The connection to the server.")
    message = param.String(default="", doc="What the last action did, for the user.")
    error = param.String(default="", doc="The last error, one line; empty when all is well.")
    found = param.Boolean(default=True, doc="Whether the page's subject is there to show.")

    back: tuple[str, str] = ("datasets", "All datasets")
    """Where the link of a page without its subject leads: (path, label)."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._alerts = pn.pane.HTML("", stylesheets=[TABLE_CSS], sizing_mode="stretch_width")
        self._missing = pn.pane.HTML(
            f'<p id="lf-back">{link(*self.back)}</p>', stylesheets=[TABLE_CSS], visible=False
        )
        self._body = pn.Column(sizing_mode="stretch_width")
        self._show_alerts()

    @property
    def connection(self) -> LavenderClient:
        """The connection to the server (the ``client`` param, which must be set)."""
        if self.client is None:
            raise ServerUnavailable("the dashboard has no connection to a server")
        client: LavenderClient = self.client
        return client

    @contextmanager
    def calling(self) -> Iterator[None]:
        """Run server calls; a failure becomes the ``error`` message, never a traceback."""
        try:
            yield
        except Exception as exc:
            self.error = describe_error(exc)
        else:
            self.error = ""

    @param.depends("message", "error", watch=True)
    def _show_alerts(self) -> None:
        parts = []
        if self.error:
            parts.append(
                f'<div class="lf-alert lf-error" role="alert">{html.escape(self.error)}</div>'
            )
        if self.message:
            parts.append(f'<div class="lf-alert lf-message">{html.escape(self.message)}</div>')
        self._alerts.object = "".join(parts)
        self._alerts.visible = bool(parts)

    @param.depends("found", watch=True)
    def _show_body(self) -> None:
        self._body.visible = self.found
        self._missing.visible = not self.found

    def layout(self, title: str, *body: Any) -> pn.Column:
        """The page: header, alerts, then its own parts (hidden while ``found`` is False)."""
        self._body.objects = list(body)
        self._show_body()
        return pn.Column(
            navigation(title), self._alerts, self._missing, self._body, sizing_mode="stretch_width"
        )
