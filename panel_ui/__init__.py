"""The Panel dashboard: datasets, shardsets, previews and live iterations in a browser.

It reads everything through the Flight server (never the catalog file) with a connection of
its own. Start it with :func:`serve_dashboard` (in-process, ``.stop()``) or :func:`main`
(``lavender-flight ui``).
"""

from __future__ import annotations

from .app import DashboardServer, add_arguments, build_routes, main, serve_dashboard
from .common import Page, describe_error
from .datasets import DatasetPage, DatasetsPage
from .iteration import IterationPage
from .plugins import PluginsPage
from .shardsets import AddShardsetForm, ShardsetPage, columns_to_text, parse_columns

__all__ = [
    "AddShardsetForm",
    "DashboardServer",
    "DatasetPage",
    "DatasetsPage",
    "IterationPage",
    "Page",
    "PluginsPage",
    "ShardsetPage",
    "add_arguments",
    "build_routes",
    "columns_to_text",
    "describe_error",
    "main",
    "parse_columns",
    "serve_dashboard",
]
