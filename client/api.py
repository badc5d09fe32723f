"""The module-level client API, mirroring the seed's ``lavender_data.client.api``.

Use it as ``from lavender_flight.client import api as lavender``.

Call :func:`init` once with the server's URL (default ``LAVENDER_FLIGHT_API_URL`` or
``grpc://127.0.0.1:8815``); every other function uses that connection.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
from pydantic import ValidationError

from ..protocol import ColumnOptions, Dataset, Shard, Shardset, SyncResult, wire
from ..protocol.errors import InvalidArgument
from ..protocol.iterations import IterationBody, IterationProgress, ListIterationsBody
from .connection import LavenderClient

__all__ = [
    "DatasetColumnOptions",
    "FeatureWriter",
    "create_dataset",
    "create_shardset",
    "delete_dataset",
    "delete_iteration",
    "delete_shardset",
    "get_client",
    "get_dataset",
    "get_iteration",
    "infer_columns",
    "get_shardset",
    "init",
    "list_actions",
    "list_datasets",
    "list_iterations",
    "list_plugins",
    "list_shards",
    "preview_dataset",
    "pushback",
    "read_dataset",
    "read_shard",
    "sync_shardset",
    "using",
    "write_feature_shardset",
]

DatasetColumnOptions = ColumnOptions
"""A column declared when creating a shardset: ``name``, ``type_``, ``description``."""

DEFAULT_API_URL = "grpc://127.0.0.1:8815"

_client: LavenderClient | None = None
_local = threading.local()


def init(
    api_url: str | None = None,
    api_key: str | None = None,
    timeout: float = 30.0,
    tls_root_certs: str | bytes | None = None,
    disable_server_verification: bool = False,
) -> LavenderClient:
    """Connect to a server; later calls of this module use the connection.

    ``api_key`` (default: ``LAVENDER_FLIGHT_API_KEY``) is sent as a bearer token on every
    call. A ``grpc+tls://`` server's certificate is verified against the system's CAs, or
    ``tls_root_certs`` (PEM) when given; ``disable_server_verification`` skips the check.
    """
    global _client
    if _client is not None:
        _client.close()
    _client = LavenderClient(
        api_url or os.environ.get("LAVENDER_FLIGHT_API_URL", DEFAULT_API_URL),
        api_key if api_key is not None else os.environ.get("LAVENDER_FLIGHT_API_KEY"),
        timeout,
        tls_root_certs,
        disable_server_verification,
    )
    return _client


def get_client() -> LavenderClient:
    """The connection in use.

    The one ``using`` set in this thread, else the one ``init`` made (made with the
    defaults on first use).
    """
    chosen = getattr(_local, "client", None)
    if chosen is not None:
        return chosen
    return _client if _client is not None else init()


@contextmanager
def using(client: LavenderClient) -> Iterator[LavenderClient]:
    """Make this module's functions use ``client`` in this thread while inside.

    For programs holding several connections (the dashboard serves pages for one server
    while a user's script talks to another).
    """
    previous = getattr(_local, "client", None)
    _local.client = client
    try:
        yield client
    finally:
        _local.client = previous


def create_dataset(name: str, uid_column_name: str = "uid") -> Dataset:
    """Create an empty dataset whose samples are identified by ``uid_column_name``."""
    body = wire.build(
        wire.CreateDatasetBody, "arguments", name=name, uid_column_name=uid_column_name
    )
    return Dataset.model_validate(get_client().action_json("create_dataset", body))


def get_dataset(dataset_id: str | None = None, name: str | None = None) -> Dataset:
    """A dataset with its shardsets, by id or by name."""
    body = wire.build(wire.GetDatasetBody, "arguments", dataset_id=dataset_id, name=name)
    return Dataset.model_validate(get_client().action_json("get_dataset", body))


def list_datasets() -> list[Dataset]:
    """Every dataset on the server."""
    return [Dataset.model_validate(d) for d in get_client().action_json("list_datasets")]


def delete_dataset(dataset_id: str) -> None:
    """Delete a dataset from the catalog (its shard files stay in storage)."""
    get_client().action(
        "delete_dataset", wire.build(wire.DatasetBody, "arguments", dataset_id=dataset_id)
    )


def _column(column: ColumnOptions | dict[str, Any]) -> ColumnOptions:
    if isinstance(column, ColumnOptions):
        return column
    try:
        return ColumnOptions.model_validate(column)
    except ValidationError as exc:
        raise InvalidArgument(f"invalid column {column!r}: {wire.problems(exc)}") from None


def create_shardset(
    dataset_id: str,
    location: str,
    columns: Sequence[ColumnOptions | dict[str, Any]] | None = None,
    is_main: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Shardset:
    """Add a shardset stored at ``location`` (a folder URL such as ``file:///data/x`` or ``s3://b/p``).

    Shards already there are checked and registered. Without ``columns``, they are inferred
    from the first shard found at the location.

    ``storage_options`` are the fsspec options of the location, laid over the server's
    defaults, e.g. ``{"key": ..., "secret": ..., "endpoint_url": "http://minio:9000"}`` for
    ``s3://``. They are stored with the shardset; secrets among them (keys, secrets, tokens,
    passwords) are never shown back: the shardset's ``storage_options`` say ``"***"``.
    """
    body = wire.build(
        wire.CreateShardsetBody,
        "arguments",
        dataset_id=dataset_id,
        location=location,
        columns=[_column(c) for c in columns] if columns is not None else None,
        is_main=is_main,
        storage_options=dict(storage_options) if storage_options is not None else None,
    )
    return Shardset.model_validate(get_client().action_json("create_shardset", body))


def get_shardset(dataset_id: str, shardset_id: str) -> Shardset:
    """One shardset of a dataset."""
    body = wire.build(
        wire.ShardsetBody, "arguments", dataset_id=dataset_id, shardset_id=shardset_id
    )
    return Shardset.model_validate(get_client().action_json("get_shardset", body))


def delete_shardset(dataset_id: str, shardset_id: str) -> None:
    """Remove a shardset from the catalog (its files stay in storage)."""
    get_client().action(
        "delete_shardset",
        wire.build(wire.ShardsetBody, "arguments", dataset_id=dataset_id, shardset_id=shardset_id),
    )


def list_shards(dataset_id: str, shardset_id: str) -> list[Shard]:
    """The shards of a shardset: file, rows, size, uid range."""
    body = wire.build(
        wire.ShardsetBody, "arguments", dataset_id=dataset_id, shardset_id=shardset_id
    )
    return [Shard.model_validate(s) for s in get_client().action_json("list_shards", body)]


def sync_shardset(dataset_id: str, shardset_id: str) -> SyncResult:
    """Register shard files added at the shardset's location since the last sync."""
    body = wire.build(
        wire.ShardsetBody, "arguments", dataset_id=dataset_id, shardset_id=shardset_id
    )
    return SyncResult.model_validate(get_client().action_json("sync_shardset", body))


def preview_dataset(
    dataset_id: str,
    offset: int = 0,
    limit: int = 10,
    columns: Sequence[str] | None = None,
    join: str = "left",
) -> pa.Table:
    """Rows ``offset .. offset + limit`` of a dataset, its shardsets joined, as a table.

    ``join="inner"`` leaves out the samples some shardset lacks (``left``: their values are
    null).
    """
    body = wire.build(
        wire.PreviewBody,
        "arguments",
        dataset_id=dataset_id,
        offset=offset,
        limit=limit,
        columns=list(columns) if columns is not None else None,
        join=join,
    )
    answer = get_client().action("preview_dataset", body)
    return pa.ipc.open_stream(answer).read_all()


def read_dataset(name: str, shardset_ids: Sequence[str] | None = None) -> pa.Table:
    """All rows of a dataset (by name or id) read over plain Flight, one endpoint at a time."""
    client = get_client()
    descriptor = flight.FlightDescriptor.for_path(name, *(shardset_ids or ()))
    with client.errors():
        info = client.flight.get_flight_info(descriptor, client.options())
    tables = [_read_ticket(client, endpoint.ticket) for endpoint in info.endpoints]
    return pa.concat_tables(tables) if tables else info.schema.empty_table()


def read_shard(
    dataset_id: str,
    shard_index: int,
    shardset_ids: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    join: str = "left",
) -> pa.Table:
    """The rows of one main shard (by its index), its shardsets joined, over plain Flight.

    ``shardset_ids`` and ``columns`` choose what is read; ``join="inner"`` leaves out the
    samples some selected shardset lacks.
    """
    ticket = wire.build(
        wire.ShardTicket,
        "arguments",
        dataset_id=dataset_id,
        shard_index=shard_index,
        shardset_ids=list(shardset_ids) if shardset_ids is not None else None,
        columns=list(columns) if columns is not None else None,
        join=join,
    )
    return _read_ticket(get_client(), flight.Ticket(wire.encode(ticket)))


def _read_ticket(client: LavenderClient, ticket: flight.Ticket) -> pa.Table:
    with client.errors():
        return client.flight.do_get(ticket, client.options(None)).read_all()


def list_actions() -> list[tuple[str, str]]:
    """The server's actions and what each does."""
    client = get_client()
    with client.errors():
        return [(a.type, a.description) for a in client.flight.list_actions(client.options())]


def get_iteration(iteration_id: str) -> IterationProgress:
    """Progress of an iteration: current, completed, filtered, failed, in flight per rank."""
    body = wire.build(IterationBody, "arguments", iteration_id=iteration_id)
    return IterationProgress.model_validate(get_client().action_json("get_iteration", body))


def list_iterations(dataset_id: str | None = None) -> list[IterationProgress]:
    """Progress of every iteration (of one dataset), newest first."""
    body = wire.build(ListIterationsBody, "arguments", dataset_id=dataset_id)
    return [
        IterationProgress.model_validate(p)
        for p in get_client().action_json("list_iterations", body)
    ]


def pushback(iteration_id: str) -> int:
    """Return every in-flight sample of an iteration to its queue; how many."""
    body = wire.build(IterationBody, "arguments", iteration_id=iteration_id)
    return int(get_client().action_json("pushback", body)["pushed_back"])


def delete_iteration(iteration_id: str) -> None:
    """Forget an iteration and its progress."""
    body = wire.build(IterationBody, "arguments", iteration_id=iteration_id)
    get_client().action("delete_iteration", body)


def infer_columns(location: str) -> list[ColumnOptions]:
    """The columns of the first shard at ``location``: what ``create_shardset`` would infer."""
    body = wire.build(wire.LocationBody, "arguments", location=location)
    return [
        ColumnOptions.model_validate(c) for c in get_client().action_json("infer_columns", body)
    ]


def list_plugins() -> dict[str, Any]:
    """The server's plugins: ``{"plugins": [{kind, name, doc, parameters...}], "problems": []}``."""
    return dict(get_client().action_json("list_plugins"))


# Last: the features module calls this one's functions (an import cycle, resolved here).
from .features import FeatureWriter, write_feature_shardset  # noqa: E402
