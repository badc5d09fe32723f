"""The dashboard's calls to the server: ``client.api`` on the connection the dashboard holds.

The dashboard keeps its own :class:`LavenderClient` (a user's script in the same process may
talk to another server), so each function takes the connection first and runs the client
API on it. Every function raises the classes of ``lavender_flight.catalog.errors``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from ..client import api
from ..client.connection import LavenderClient
from ..protocol import ColumnOptions, Dataset, Shard, Shardset, SyncResult
from ..protocol.errors import LavenderError
from ..protocol.iterations import IterationProgress

__all__ = [
    "create_dataset",
    "create_shardset",
    "describe_error",
    "get_dataset",
    "get_iteration",
    "get_shardset",
    "infer_columns",
    "list_datasets",
    "list_iterations",
    "list_plugins",
    "list_shards",
    "preview_dataset",
    "pushback",
    "sync_shardset",
]

log = logging.getLogger(__name__)


def describe_error(exc: BaseException) -> str:
    """One line for a page: ``DatasetNotFound: no dataset named 'x'``, never a traceback.

    Errors that are not ours (a bug) are logged with their traceback on the server side.
    """
    if not isinstance(exc, LavenderError):
        log.error("dashboard call failed", exc_info=exc)
    text = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {text}"


def list_datasets(client: LavenderClient) -> list[Dataset]:
    """Every dataset on the server."""
    with api.using(client):
        return api.list_datasets()


def get_dataset(client: LavenderClient, dataset_id: str) -> Dataset:
    """A dataset with its shardsets."""
    with api.using(client):
        return api.get_dataset(dataset_id=dataset_id)


def create_dataset(client: LavenderClient, name: str, uid_column_name: str = "uid") -> Dataset:
    """Create an empty dataset."""
    with api.using(client):
        return api.create_dataset(name, uid_column_name)


def create_shardset(
    client: LavenderClient,
    dataset_id: str,
    location: str,
    columns: Sequence[ColumnOptions] | None = None,
    is_main: bool = False,
) -> Shardset:
    """Add a shardset at ``location``; without ``columns`` the server infers them."""
    with api.using(client):
        return api.create_shardset(dataset_id, location, columns, is_main)


def infer_columns(client: LavenderClient, location: str) -> list[ColumnOptions]:
    """The columns of the first shard file at ``location``, before any shardset exists.

    Raises ``ActionNotFound`` on a server without the ``infer_columns`` action.
    """
    with api.using(client):
        return api.infer_columns(location)


def get_shardset(client: LavenderClient, dataset_id: str, shardset_id: str) -> Shardset:
    """One shardset of a dataset."""
    with api.using(client):
        return api.get_shardset(dataset_id, shardset_id)


def list_shards(client: LavenderClient, dataset_id: str, shardset_id: str) -> list[Shard]:
    """The shards of a shardset."""
    with api.using(client):
        return api.list_shards(dataset_id, shardset_id)


def sync_shardset(client: LavenderClient, dataset_id: str, shardset_id: str) -> SyncResult:
    """Register the shard files added at a shardset's location since the last sync."""
    with api.using(client):
        return api.sync_shardset(dataset_id, shardset_id)


def preview_dataset(
    client: LavenderClient,
    dataset_id: str,
    offset: int = 0,
    limit: int = 10,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Joined rows ``offset .. offset + limit`` of a dataset."""
    with api.using(client):
        return api.preview_dataset(dataset_id, offset, limit, columns)


def list_iterations(
    client: LavenderClient, dataset_id: str | None = None
) -> list[IterationProgress]:
    """Progress of every iteration (of one dataset), newest first."""
    with api.using(client):
        return api.list_iterations(dataset_id)


def get_iteration(client: LavenderClient, iteration_id: str) -> IterationProgress:
    """Progress of one iteration."""
    with api.using(client):
        return api.get_iteration(iteration_id)


def pushback(client: LavenderClient, iteration_id: str) -> int:
    """Return every in-flight sample of an iteration to its queue; how many."""
    with api.using(client):
        return api.pushback(iteration_id)


def list_plugins(client: LavenderClient) -> tuple[list[dict[str, Any]], list[str]]:
    """The server's plugins and the plugin files that failed to load.

    Accepts the answer of the ``list_plugins`` action as ``{"plugins": [...], "problems":
    [...]}`` or as a bare list of plugins. Raises ``ActionNotFound`` on a server without it.
    """
    answer = client.action_json("list_plugins")
    if answer is None:
        return [], []
    if isinstance(answer, dict):
        plugins = answer.get("plugins") or []
        problems = [str(p) for p in answer.get("problems") or []]
    else:
        plugins, problems = answer, []
    return [p if isinstance(p, dict) else {"name": str(p)} for p in plugins], problems
