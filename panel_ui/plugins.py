"""The plugins page: the filters, collaters and preprocessors a server offers."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import panel as pn
import param

from ..protocol.errors import ActionNotFound
from ..protocol.wire import PluginParameter
from .common import TABLE_CSS, Page, describe_error, html_table

__all__ = ["PluginsPage", "describe_parameters", "doc_html"]

NO_PLUGINS = "No plugins installed."
NO_ACTION = (
    "This server cannot list its plugins (it has no 'list_plugins' action): "
    "update the server to see its filters, collaters and preprocessors."
)


_ROLE = re.compile(r":[a-z:]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``")
_INTERPRETED = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(.+?)\*\*")
_EMPHASIS = re.compile(r"\*(\S(?:.*?\S)?)\*")


def doc_html(text: str) -> str:
    """A docstring line's reStructuredText markup as HTML (everything else escaped).

    ````x````, ```x``` and ``:role:`x``` (``~a.b.c`` as ``c``) become code, ``**x**`` bold and
    ``*x*`` emphasis, so the plugins page shows no raw markup.
    """
    escaped = html.escape(text, quote=False)
    escaped = _ROLE.sub(lambda m: f"<code>{m.group(1).rsplit('.', 1)[-1]}</code>", escaped)
    escaped = _LITERAL.sub(r"<code>\1</code>", escaped)
    escaped = _INTERPRETED.sub(r"<code>\1</code>", escaped)
    escaped = _STRONG.sub(r"<b>\1</b>", escaped)
    return _EMPHASIS.sub(r"<em>\1</em>", escaped)


def _parameter(p: PluginParameter) -> str:
    text = p.name
    if p.type:
        text += f": {p.type}"
    if not p.required and "default" in p.model_fields_set:
        text += f" = {p.default!r}"
    return text


def describe_parameters(
    parameters: Sequence[PluginParameter | Mapping[str, Any]] | Mapping[str, Any] | None,
) -> str:
    """Parameters in one line, ``name: type = default, ...``.

    The plugins page passes the ``PluginParameter`` models of a ``list_plugins`` answer;
    plain ``{name, type, default, required}`` dicts, or a mapping of names to a type or to
    such a dict, read the same (for callers holding JSON).
    """
    if not parameters:
        return ""
    if isinstance(parameters, Mapping):  # {"name": {...}} or {"name": "type"}
        parameters = [
            {"name": k, **v} if isinstance(v, Mapping) else {"name": k, "type": v}
            for k, v in parameters.items()
        ]
    return ", ".join(
        _parameter(p if isinstance(p, PluginParameter) else PluginParameter.model_validate(p))
        for p in parameters
    )


class PluginsPage(Page):
    """The server's plugins: kind, name, parameters, description, where each comes from."""

    plugins = param.DataFrame(default=None, doc="One row per plugin.")
    problems = param.List(default=[], item_type=str, doc="Plugin files that failed to load.")
    available = param.Boolean(default=True, doc="Whether the server can list its plugins.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._table = pn.pane.HTML("", stylesheets=[TABLE_CSS], sizing_mode="stretch_width")
        self.refresh()
        self._render()

    def refresh(self) -> None:
        """Ask the server for its plugins."""
        try:
            answer = self.connection.list_plugins()
        except ActionNotFound:
            self.available, self.error = False, ""
            self.plugins, self.problems = None, []
            self.message = NO_ACTION
            return
        except Exception as exc:
            self.error = describe_error(exc)
            return
        self.available, self.error = True, ""
        self.plugins = pd.DataFrame(
            [
                {
                    "kind": p.kind,
                    "name": p.name,
                    "parameters": describe_parameters(p.parameters),
                    "description": p.doc,
                    "source": p.source,
                }
                for p in answer.plugins
            ],
            columns=["kind", "name", "parameters", "description", "source"],
        )
        self.problems = list(answer.problems)
        self.message = "" if answer.plugins else NO_PLUGINS

    @param.depends("plugins", "problems", watch=True)
    def _render(self) -> None:
        table = (
            ""
            if self.plugins is None
            else html_table(
                self.plugins,
                "plugins-table",
                links={"description": lambda row: doc_html(str(row["description"] or ""))},
                empty="",
            )
        )
        broken = "".join(f"<li>{html.escape(p)}</li>" for p in self.problems)
        if broken:
            table += f'<h3>Failed to load</h3><ul id="plugin-problems">{broken}</ul>'
        self._table.object = table

    def __panel__(self) -> pn.viewable.Viewable:
        return self.layout("Plugins", self._table)
