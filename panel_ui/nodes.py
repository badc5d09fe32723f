"""The nodes page: every server sharing the catalog, alive or not, and what it streams."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import panel as pn
import param

from ..protocol.errors import ActionNotFound
from ..protocol.iterations import NodeInfo
from .common import TABLE_CSS, Page, describe_error, format_ago, format_time, html_table

__all__ = ["NO_NODES_ACTION", "NodesPage", "nodes_frame"]

NO_NODES_ACTION = (
    "This server cannot list the servers sharing its catalog (it has no 'list_nodes' "
    "action): update the server to see them."
)


def nodes_frame(nodes: list[NodeInfo], now: float | None = None) -> pd.DataFrame:
    """One row per server: location, alive, last heartbeat (and how long ago), streams, rate."""
    now = time.time() if now is None else now
    return pd.DataFrame(
        [
            {
                "location": n.location,
                "alive": "yes" if n.alive else "no (heartbeat lapsed)",
                "last heartbeat": (
                    f"{format_time(n.heartbeat_at)} ({format_ago(n.heartbeat_at, now)})"
                ),
                "streams": n.streams,
                "samples/s": round(n.samples_per_s, 1),
                "started": format_time(n.started_at),
                "id": n.id,
            }
            for n in nodes
        ],
        columns=["location", "alive", "last heartbeat", "streams", "samples/s", "started", "id"],
    )


class NodesPage(Page):
    """``/nodes``: the servers on this catalog, read every ``period_ms`` while open."""

    nodes = param.DataFrame(default=None, doc="One row per server.")
    available = param.Boolean(default=True, doc="Whether the server can list the nodes.")
    period_ms = param.Integer(default=2000, bounds=(200, None), doc="How often to read them.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._table = pn.pane.HTML("", stylesheets=[TABLE_CSS], sizing_mode="stretch_width")
        self._summary = pn.pane.HTML("", stylesheets=[TABLE_CSS], sizing_mode="stretch_width")
        self._poll: Any = None
        self.refresh()

    def refresh(self) -> None:
        """Ask the server for the nodes on its catalog."""
        if not self.available:
            return
        try:
            found = self.connection.list_nodes()
        except ActionNotFound:
            self.available, self.error, self.nodes = False, "", None
            self.message = NO_NODES_ACTION
            return
        except Exception as exc:
            self.error = describe_error(exc)
            return
        self.error = ""
        self.nodes = nodes_frame(found)
        alive = sum(n.alive for n in found)
        streams = sum(n.streams for n in found)
        self._summary.object = (
            f'<p id="nodes-summary">{len(found)} server{"s" if len(found) != 1 else ""} on '
            f"this catalog, {alive} alive · {streams} stream{'s' if streams != 1 else ''} · "
            f"{sum(n.samples_per_s for n in found):.1f} samples/s</p>"
        )

    def start_polling(self) -> None:
        """Read the nodes every ``period_ms`` in the browser session."""
        if self._poll is None and self.available:
            self._poll = pn.state.add_periodic_callback(self.refresh, period=self.period_ms)

    @param.depends("nodes", watch=True)
    def _render(self) -> None:
        self._table.object = (
            ""
            if self.nodes is None
            else html_table(self.nodes, "nodes-table", empty="No server registered.")
        )

    def __panel__(self) -> pn.viewable.Viewable:
        self._render()
        return self.layout("Nodes", self._summary, self._table)
