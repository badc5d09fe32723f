"""The dashboard's calls to the server: ``client.api`` on a connection the dashboard holds.

``lavender_flight.client.api`` works on one module-global connection; the dashboard serves
many browser sessions from one process and keeps its own :class:`LavenderClient`, so each
function here takes the connection first. Every function raises the classes of
``lavender_flight.catalog.errors`` with one-line messages, like the client API.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from ..catalog import ColumnOptions, Dataset, IterationProgress, Shard, Shardset, SyncResult
from ..catalog.errors import LavenderError
from ..client.connection import LavenderClient
from ..flight_server import wire

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
    return [Dataset.model_validate(d) for d in client.action_json("list_datasets") or []]


def get_dataset(client: LavenderClient, dataset_id: str) -> Dataset:
    """A dataset with its shardsets."""
    body = wire.build(wire.GetDatasetBody, "arguments", dataset_id=dataset_id)
    return Dataset.model_validate(client.action_json("get_dataset", body))


def create_dataset(client: LavenderClient, name: str, uid_column_name: str = "uid") -> Dataset:
    """Create an empty dataset."""
    body = wire.build(
        wire.CreateDatasetBody, "arguments", name=name, uid_column_name=uid_column_name
    )
    return Dataset.model_validate(client.action_json("create_dataset", body))


def create_shardset(
    client: LavenderClient,
    dataset_id: str,
    location: str,
    columns: Sequence[ColumnOptions] | None = None,
    is_main: bool = False,
) -> Shardset:
    """Add a shardset at ``location``; without ``columns`` the server infers them."""
    body = wire.build(
        wire.CreateShardsetBody,
        "arguments",
        dataset_id=dataset_id,
        location=location,
        columns=list(columns) if columns is not None else None,
        is_main=is_main,
    )
    return Shardset.model_validate(client.action_json("create_shardset", body))


def infer_columns(client: LavenderClient, location: str) -> list[ColumnOptions]:
    """The columns of the first shard file at ``location``, before any shardset exists.

    Calls the server action ``infer_columns`` with the body ``{"v": 1, "location": ...}``;
    it answers a JSON array of ``{"name", "type", "description"}``. Raises
    ``ActionNotFound`` on a server without that action.
    """
    body = wire.build(wire.LocationBody, "arguments", location=location)
    return [ColumnOptions.model_validate(c) for c in client.action_json("infer_columns", body)]


def get_shardset(client: LavenderClient, dataset_id: str, shardset_id: str) -> Shardset:
    """One shardset of a dataset."""
    body = wire.build(
        wire.ShardsetBody, "arguments", dataset_id=dataset_id, shardset_id=shardset_id
    )
    return Shardset.model_validate(client.action_json("get_shardset", body))


def list_shards(client: LavenderClient, dataset_id: str, shardset_id: str) -> list[Shard]:
    """The shards of a shardset."""
    body = wire.build(
        wire.ShardsetBody, "arguments", dataset_id=dataset_id, shardset_id=shardset_id
    )
    return [Shard.model_validate(s) for s in client.action_json("list_shards", body) or []]


def sync_shardset(client: LavenderClient, dataset_id: str, shardset_id: str) -> SyncResult:
    """Register the shard files added at a shardset's location since the last sync."""
    body = wire.build(
        wire.ShardsetBody, "arguments", dataset_id=dataset_id, shardset_id=shardset_id
    )
    return SyncResult.model_validate(client.action_json("sync_shardset", body))


def preview_dataset(
    client: LavenderClient,
    dataset_id: str,
    offset: int = 0,
    limit: int = 10,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Joined rows ``offset .. offset + limit`` of a dataset."""
    body = wire.build(
        wire.PreviewBody,
        "arguments",
        dataset_id=dataset_id,
        offset=offset,
        limit=limit,
        columns=list(columns) if columns is not None else None,
    )
    answer = client.action("preview_dataset", body)
    with client.errors():
        return pa.ipc.open_stream(answer).read_all()


def list_iterations(
    client: LavenderClient, dataset_id: str | None = None
) -> list[IterationProgress]:
    """Progress of every iteration (of one dataset), newest first."""
    body = wire.build(wire.ListIterationsBody, "arguments", dataset_id=dataset_id)
    return [
        IterationProgress.model_validate(p)
        for p in client.action_json("list_iterations", body) or []
    ]


def get_iteration(client: LavenderClient, iteration_id: str) -> IterationProgress:
    """Progress of one iteration."""
    body = wire.build(wire.IterationBody, "arguments", iteration_id=iteration_id)
    return IterationProgress.model_validate(client.action_json("get_iteration", body))


def pushback(client: LavenderClient, iteration_id: str) -> int:
    """Return every in-flight sample of an iteration to its queue; how many."""
    body = wire.build(wire.IterationBody, "arguments", iteration_id=iteration_id)
    return int(client.action_json("pushback", body)["pushed_back"])


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
