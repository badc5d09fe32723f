"""The Panel dashboard: datasets, shardsets, previews, iterations and servers in a browser.

It reads everything through the Flight server (never the catalog file) with a connection of
its own. Start it with :func:`serve_dashboard` (in-process, ``.stop()``) or :func:`main`
(``lavender-flight ui``).
"""

from __future__ import annotations

from .app import DashboardServer, add_arguments, build_routes, main, serve_dashboard
from .common import Page, arrow_frame, describe_error
from .datasets import DatasetPage, DatasetsPage
from .deletion import ConfirmDelete, Doomed
from .iteration import IterationPage, ranks_frame
from .iterations import IterationsPage, IterationsTable, iterations_frame
from .login import KeyLogin, key_matches
from .nodes import NodesPage, nodes_frame
from .plugins import PluginsPage, doc_html
from .shardsets import AddShardsetForm, ShardsetPage, columns_to_text, parse_columns
from .throughput import Throughput

__all__ = [
    "AddShardsetForm",
    "ConfirmDelete",
    "DashboardServer",
    "DatasetPage",
    "DatasetsPage",
    "Doomed",
    "IterationPage",
    "IterationsPage",
    "IterationsTable",
    "KeyLogin",
    "NodesPage",
    "Page",
    "PluginsPage",
    "ShardsetPage",
    "Throughput",
    "add_arguments",
    "arrow_frame",
    "build_routes",
    "columns_to_text",
    "describe_error",
    "doc_html",
    "iterations_frame",
    "key_matches",
    "main",
    "nodes_frame",
    "parse_columns",
    "ranks_frame",
    "serve_dashboard",
]
