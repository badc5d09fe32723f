"""The module-level client API, mirroring the seed's ``lavender_data.client.api``.

Use it as ``from lavender_flight.client import api as lavender``.

Call :func:`init` once with the server's URL; every other function runs the method of the
same name of the default :class:`LavenderClient` that ``init`` made. Programs holding
several connections (the dashboard) make their own ``LavenderClient`` instead.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from ..protocol import ColumnOptions, Dataset, Shard, Shardset, SyncResult, wire
from ..protocol.errors import InvalidArgument, ServerUnavailable
from ..protocol.iterations import IterationProgress, NodeInfo, WeightsSet
from .connection import LavenderClient
from .settings import DEFAULT_RECONNECT_SECONDS, DEFAULT_TIMEOUT, ClientSettings

__all__ = [
    "ClientSettings",
    "DatasetColumnOptions",
    "FeatureWriter",
    "LavenderClient",
    "MixtureSource",
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
    "list_nodes",
    "list_plugins",
    "list_shards",
    "preview_dataset",
    "pushback",
    "read_dataset",
    "read_shard",
    "set_mixture_weights",
    "sync_shardset",
    "write_feature_shardset",
]

DatasetColumnOptions = ColumnOptions
"""A column declared when creating a shardset: ``name``, ``type_``, ``description``."""

_client: LavenderClient | None = None
_failure: str | None = None
"""Why the last ``init`` failed (None: it did not); while set, nothing connects on its own."""
_lock = threading.RLock()


def init(
    api_url: str | Sequence[str] | ClientSettings | None = None,
    api_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    tls_root_certs: str | bytes | None = None,
    disable_server_verification: bool = False,
    reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
) -> LavenderClient:
    """Connect to a server; the other functions of this module use that connection.

    ``api_url`` is ``grpc://HOST:PORT`` (``grpc+tls://HOST:PORT`` for a server with TLS), a
    list of them, or a whole :class:`ClientSettings` (then pass no other argument); default
    ``LAVENDER_FLIGHT_API_URL``, else ``grpc://127.0.0.1:8815``. ``api_key`` (default:
    ``LAVENDER_FLIGHT_API_KEY``) is sent as a bearer token on every call. A ``grpc+tls://``
    server's certificate is verified against the system's CAs, or ``tls_root_certs`` (PEM)
    when given; ``disable_server_verification`` skips the check.

    The connection is made lazily: an unreachable server fails the first call with
    ``ServerUnavailable``. Settings that cannot work (an ``http://`` URL, TLS roots that are
    not PEM) fail here, at once, with ``InvalidArgument``; the previous connection is closed
    all the same, and until an ``init`` succeeds every call raises ``ServerUnavailable``
    saying so (it never falls back to the default URL).

    A call made before any ``init`` connects with ``init()``'s defaults (the environment,
    else ``grpc://127.0.0.1:8815``), as the seed does.
    """
    global _client, _failure
    with _lock:
        if _client is not None:
            _client.close()
            _client = None
        try:
            if isinstance(api_url, ClientSettings):
                given = (api_key, timeout, tls_root_certs, disable_server_verification)
                if given != (None, DEFAULT_TIMEOUT, None, False) or (
                    reconnect_seconds != DEFAULT_RECONNECT_SECONDS
                ):
                    raise InvalidArgument(
                        "init takes ClientSettings alone: put api_key, timeout and the TLS "
                        "options in the settings"
                    )
                settings = api_url
            else:
                settings = ClientSettings.from_env(
                    api_url,
                    api_key,
                    timeout=timeout,
                    tls_root_certs=tls_root_certs,
                    disable_server_verification=disable_server_verification,
                    reconnect_seconds=reconnect_seconds,
                )
            client = LavenderClient(settings)
        except Exception as exc:
            _failure = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise
        _client, _failure = client, None
        return client


def get_client() -> LavenderClient:
    """The default client: the one :func:`init` made.

    Before any ``init``, the first call makes it with ``init()``'s defaults. After an
    ``init`` that failed, raises ``ServerUnavailable`` until an ``init`` succeeds.
    """
    client = _client
    if client is not None:
        return client
    with _lock:
        if _client is not None:
            return _client
        if _failure is not None:
            raise ServerUnavailable(
                f"no connection: the last lavender.init(...) failed ({_failure}); call "
                "lavender.init first, with the server's grpc:// URL"
            )
        return init()


def create_dataset(name: str, uid_column_name: str = "uid") -> Dataset:
    """Create an empty dataset whose samples are identified by ``uid_column_name``."""
    return get_client().create_dataset(name, uid_column_name)


def get_dataset(dataset_id: str | None = None, name: str | None = None) -> Dataset:
    """A dataset with its shardsets, by id or by name."""
    return get_client().get_dataset(dataset_id, name)


def list_datasets() -> list[Dataset]:
    """Every dataset on the server."""
    return get_client().list_datasets()


def delete_dataset(dataset_id: str, force: bool = False) -> wire.Deleted:
    """Delete a dataset and its iterations from the catalog (its shard files stay in storage).

    One with live iterations is refused (``IterationBusy``) unless ``force=True``, which
    ends them first (their readers get ``IterationNotFound``).
    """
    return get_client().delete_dataset(dataset_id, force)


def create_shardset(
    dataset_id: str,
    location: str,
    columns: Sequence[ColumnOptions | Mapping[str, Any]] | None = None,
    is_main: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Shardset:
    """Add a shardset stored at ``location`` (a folder URL such as ``file:///data/x`` or ``s3://b/p``).

    Shards already there are checked and registered. Without ``columns``, they are inferred
    from the first shard found at the location. ``storage_options`` are the location's
    fsspec options; their secrets are never shown back (see
    :meth:`LavenderClient.create_shardset`).
    """
    return get_client().create_shardset(dataset_id, location, columns, is_main, storage_options)


def get_shardset(dataset_id: str, shardset_id: str) -> Shardset:
    """One shardset of a dataset."""
    return get_client().get_shardset(dataset_id, shardset_id)


def delete_shardset(dataset_id: str, shardset_id: str, force: bool = False) -> wire.Deleted:
    """Remove a shardset from the catalog (its files stay in storage).

    One that live iterations read is refused (``IterationBusy``) unless ``force=True``,
    which ends them first (their readers get ``IterationNotFound``).
    """
    return get_client().delete_shardset(dataset_id, shardset_id, force)


def list_shards(dataset_id: str, shardset_id: str) -> list[Shard]:
    """The shards of a shardset: file, rows, size, uid range."""
    return get_client().list_shards(dataset_id, shardset_id)


def sync_shardset(dataset_id: str, shardset_id: str) -> SyncResult:
    """Register shard files added at the shardset's location since the last sync."""
    return get_client().sync_shardset(dataset_id, shardset_id)


def infer_columns(location: str) -> list[ColumnOptions]:
    """The columns of the first shard at ``location``: what ``create_shardset`` would infer."""
    return get_client().infer_columns(location)


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
    return get_client().preview_dataset(dataset_id, offset, limit, columns, join)


def read_dataset(name: str, shardset_ids: Sequence[str] | None = None) -> pa.Table:
    """All rows of a dataset (by name or id) read over plain Flight, one endpoint at a time."""
    return get_client().read_dataset(name, shardset_ids)


def read_shard(
    dataset_id: str,
    shard_index: int,
    shardset_ids: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    join: str = "left",
) -> pa.Table:
    """The rows of one main shard (by its index), its shardsets joined, over plain Flight."""
    return get_client().read_shard(dataset_id, shard_index, shardset_ids, columns, join)


def list_actions() -> list[tuple[str, str]]:
    """The server's actions and what each does."""
    return get_client().list_actions()


def list_plugins() -> wire.PluginList:
    """The server's plugins (``.plugins``) and the files that failed to load (``.problems``)."""
    return get_client().list_plugins()


def get_iteration(iteration_id: str) -> IterationProgress:
    """Progress of an iteration: current, completed, filtered, failed, in flight per rank."""
    return get_client().get_iteration(iteration_id)


def list_iterations(
    dataset_id: str | None = None,
    state: str | None = None,
    offset: int = 0,
    limit: int | None = None,
    ranks: bool = False,
) -> list[IterationProgress]:
    """Progress of the iterations (of one dataset), newest first.

    ``state`` ``"running"`` or ``"done"`` keeps those; ``offset`` and ``limit`` page them
    (default: every one); ``ranks`` adds each rank's progress.
    """
    return get_client().list_iterations(dataset_id, state, offset, limit, ranks)


def pushback(iteration_id: str) -> int:
    """Return every in-flight sample of an iteration to its queue; how many."""
    return get_client().pushback(iteration_id)


def set_mixture_weights(
    iteration_id: str, weights: Mapping[str, float], at: int | None = None
) -> WeightsSet:
    """Change a mixture's weights ``{dataset_id: weight}`` for every rank, from the next sample.

    The change and the sample where it took effect are stored, so a resume replays the same
    order (see :meth:`LavenderClient.set_mixture_weights`).
    """
    return get_client().set_mixture_weights(iteration_id, weights, at)


def delete_iteration(iteration_id: str, force: bool = False) -> wire.Deleted:
    """Forget an iteration and its progress.

    One with open streams is refused (``IterationBusy``) unless ``force=True``, which ends
    them first (their readers get ``IterationNotFound``).
    """
    return get_client().delete_iteration(iteration_id, force)


def list_nodes() -> list[NodeInfo]:
    """The servers sharing the catalog: location, last heartbeat, alive, streams."""
    return get_client().list_nodes()


# Last: the features module uses this one's default client (an import cycle, resolved here).
from .features import FeatureWriter, write_feature_shardset  # noqa: E402
from .iteration import MixtureSource  # noqa: E402
