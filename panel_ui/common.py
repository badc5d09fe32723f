"""What every page shares: the connection, a message line, errors shown as text, tables.

Tables are plain HTML built from the pages' DataFrame params (every value escaped), so a
page's state is testable without a browser and the browser needs nothing but Panel's own
bundled resources.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

import pandas as pd
import panel as pn
import param

from ..client.connection import LavenderClient
from ..protocol.errors import LavenderError, ServerUnavailable

__all__ = [
    "TABLE_CSS",
    "Page",
    "describe_error",
    "format_bytes",
    "format_time",
    "html_table",
    "link",
    "navigation",
]

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
) -> str:
    """An HTML table of a DataFrame; ``links`` renders some columns as links of a row."""
    if frame is None or frame.empty:
        return f'<p class="lf-empty" id="{table_id}-empty">{html.escape(empty)}</p>'
    links = links or {}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for record in frame.to_dict("records"):
        cells = []
        for column, value in record.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            content = links[column](record) if column in links else _cell(value)
            cells.append(f'<td class="num">{content}</td>' if numeric else f"<td>{content}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<table class="lf-table" id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def navigation(title: str) -> pn.viewable.Viewable:
    """The header of every page: the product name, links to the lists, the page title."""
    return pn.pane.HTML(
        '<div style="display:flex;gap:18px;align-items:baseline">'
        '<b style="color:#5b3a99;font-size:18px">Lavender Flight</b>'
        f"{link('datasets', 'Datasets')}{link('plugins', 'Plugins')}</div>"
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
    """

    client = param.ClassSelector(class_=LavenderClient, doc="The connection to the server.")
    message = param.String(default="", doc="What the last action did, for the user.")
    error = param.String(default="", doc="The last error, one line; empty when all is well.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._alerts = pn.pane.HTML("", stylesheets=[TABLE_CSS], sizing_mode="stretch_width")
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

    def layout(self, title: str, *body: Any) -> pn.Column:
        """The page: header, alerts, then its own parts."""
        return pn.Column(navigation(title), self._alerts, *body, sizing_mode="stretch_width")
