"""``LavenderClient``: a connection to a service, with the whole client API as methods.

The low-level layer (``flight``, :meth:`LavenderClient.options`, :meth:`~LavenderClient.errors`,
:meth:`~LavenderClient.action`) sends typed bodies and rebuilds server errors as our classes;
the methods above it parse every answer with the models of ``protocol``.

A service may run on several servers sharing one catalog (``ClientSettings`` with several
URLs): a call that cannot reach the server in use goes to the next one, and the one that
answered is used from then on. :meth:`LavenderClient.at` opens a connection to one server of
the service (the location of an endpoint) with the same settings.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight
from pydantic import BaseModel, TypeAdapter, ValidationError

from ..protocol import ColumnOptions, Dataset, Shard, Shardset, SyncResult, wire
from ..protocol.errors import (
    InvalidArgument,
    LavenderError,
    SchemaMismatch,
    ServerError,
    ServerUnavailable,
    from_flight_error,
)
from ..protocol.iterations import (
    DeleteIterationBody,
    IterationBody,
    IterationProgress,
    ListIterationsBody,
    MixtureWeightsBody,
    NodeInfo,
    WeightsSet,
)
from .settings import ClientSettings

__all__ = ["LavenderClient", "column_options", "domain_error", "endpoint_locations"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_DATASETS: TypeAdapter[list[Dataset]] = TypeAdapter(list[Dataset])
_SHARDS: TypeAdapter[list[Shard]] = TypeAdapter(list[Shard])
_COLUMNS: TypeAdapter[list[ColumnOptions]] = TypeAdapter(list[ColumnOptions])
_PROGRESSES: TypeAdapter[list[IterationProgress]] = TypeAdapter(list[IterationProgress])
_NODES: TypeAdapter[list[NodeInfo]] = TypeAdapter(list[NodeInfo])


def endpoint_locations(endpoint: flight.FlightEndpoint) -> list[str]:
    """The URLs of an endpoint's locations, in order (empty: the server that answered)."""
    found = []
    for location in endpoint.locations:
        uri = location.uri
        found.append(uri.decode() if isinstance(uri, bytes) else str(uri))
    return found


def domain_error(exc: BaseException, url: str = "") -> LavenderError:
    """The error of ours that a Flight error stands for (its class is named in the message)."""
    return from_flight_error(exc, url)


def column_options(column: ColumnOptions | Mapping[str, Any]) -> ColumnOptions:
    """A column declaration from a ``ColumnOptions`` or a dict (``name``, ``type``...)."""
    if isinstance(column, ColumnOptions):
        return column
    try:
        return ColumnOptions.model_validate(column)
    except ValidationError as exc:
        raise InvalidArgument(f"invalid column {column!r}: {wire.problems(exc)}") from None


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _parse(kind: type[T] | TypeAdapter[T], answer: bytes, action: str) -> T:
    """An action's JSON answer as ``kind``; a server that breaks the contract is a ServerError."""
    if isinstance(kind, TypeAdapter):
        adapter: TypeAdapter[Any] = kind
    else:
        adapter = _ADAPTERS.get(kind) or _ADAPTERS.setdefault(kind, TypeAdapter(kind))
    try:
        return adapter.validate_json(answer or b"null")
    except ValidationError as exc:
        raise ServerError(
            f"the server's answer to {action} does not fit this client: {wire.problems(exc)} "
            "(are client and server of one version?)"
        ) from None


class LavenderClient:
    """A connection to a Lavender Flight service, made from :class:`ClientSettings`.

    Every call has the settings' timeout, so a dead server fails fast instead of hanging a
    training job; streams have none, they last as long as the data. Connecting is lazy: a
    server that is not there fails the first call with ``ServerUnavailable``. With several
    URLs, a call that cannot reach the server in use (``ServerUnavailable``: refused, cut,
    or no answer in time) is sent to the next one; the one that answers is kept.
    """

    def __init__(self, settings: ClientSettings) -> None:
        """Open a connection to ``settings.api_url`` with the settings' key and TLS options."""
        if not isinstance(settings, ClientSettings):
            raise InvalidArgument(
                f"LavenderClient takes ClientSettings, got {type(settings).__name__}: "
                "LavenderClient(ClientSettings('grpc://HOST:8815', api_key=...))"
            )
        self.settings = settings
        key = settings.api_key_value()
        self._headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        tls: dict[str, Any] = {}
        if settings.tls_root_certs is not None:
            tls["tls_root_certs"] = settings.tls_root_certs
        if settings.disable_server_verification:
            tls["disable_server_verification"] = True
        self._tls = tls
        self._index = 0
        self._connections: dict[int, flight.FlightClient] = {}
        self._nodes: dict[str, LavenderClient] = {}
        self._lock = threading.Lock()
        self._connection(0)  # a malformed URL fails here

    def _connection(self, index: int) -> flight.FlightClient:
        with self._lock:
            found = self._connections.get(index)
            if found is None:
                url = self.settings.api_urls[index]
                try:
                    found = flight.connect(url, **self._tls)
                except (flight.FlightError, pa.ArrowException) as exc:
                    raise domain_error(exc, url) from None
                self._connections[index] = found
            return found

    @property
    def flight(self) -> flight.FlightClient:
        """The Flight connection in use (to ``api_url``)."""
        return self._connection(self._index)

    @flight.setter
    def flight(self, connection: flight.FlightClient) -> None:
        self._connections[self._index] = connection

    @property
    def api_url(self) -> str:
        """The URL in use: the first of the settings', or the one a failover moved to."""
        return self.settings.api_urls[self._index]

    def __repr__(self) -> str:
        return f"LavenderClient({self.settings!r})"

    def at(self, url: str) -> LavenderClient:
        """A connection to the server at ``url`` (e.g. an endpoint's location), same settings.

        This one when it is a connection to ``url`` alone; else one kept for the next asks
        of the same URL, and closed with this one.
        """
        if self.settings.api_urls == (url,):
            return self
        with self._lock:
            found = self._nodes.get(url)
            if found is None:
                found = self._nodes[url] = LavenderClient(self.settings.replace(api_url=url))
            return found

    # -- the low-level layer -------------------------------------------------------------

    def options(self, timeout: float | None = -1.0) -> pa.flight.FlightCallOptions:
        """Call options: the API key header and a timeout (default: the settings'; None: none)."""
        return flight.FlightCallOptions(
            timeout=self.settings.timeout if timeout == -1.0 else timeout, headers=self._headers
        )

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Rebuild server errors as our exception classes, with no gRPC dump."""
        try:
            yield
        except LavenderError:
            raise
        except (flight.FlightError, pa.ArrowException) as exc:
            raise domain_error(exc, self.api_url) from None

    def failover(self, call: Callable[[pa.flight.FlightClient], T]) -> T:
        """Run ``call`` on the connection in use; when its server is unreachable, on the next.

        Each URL of the settings is tried once, starting with the one in use; the first that
        answers is used from then on. Errors are rebuilt as ours (see :meth:`errors`).

        Raises:
            ServerUnavailable: no server answered (the message names them, and the last
                error).
        """
        urls = self.settings.api_urls
        first = self._index
        last: ServerUnavailable | None = None
        for step in range(len(urls)):
            index = (first + step) % len(urls)
            try:
                connection = self._connection(index)
                try:
                    result = call(connection)
                except LavenderError:
                    raise
                except (flight.FlightError, pa.ArrowException) as exc:
                    raise domain_error(exc, urls[index]) from None
            except ServerUnavailable as exc:
                last = exc
                continue
            if index != self._index:
                log.warning("the server at %s answers now (%s did not)", urls[index],
                            urls[self._index])  # fmt: skip
                self._index = index
            return result
        assert last is not None
        if len(urls) == 1:
            raise last
        raise ServerUnavailable(
            f"none of the {len(urls)} servers ({', '.join(urls)}) answered; the last: {last}"
        ) from None

    def action(self, name: str, body: BaseModel | dict[str, Any] | None = None) -> bytes:
        """Run ``do_action`` and return its answer's bytes."""
        if isinstance(body, BaseModel):
            payload = body.model_dump_json(by_alias=True).encode()
        else:
            payload = json.dumps(body or {}).encode()
        action = flight.Action(name, payload)
        results = self.failover(lambda f: list(f.do_action(action, self.options())))
        return results[0].body.to_pybytes() if results else b""

    def action_json(self, name: str, body: BaseModel | dict[str, Any] | None = None) -> Any:
        """Run ``do_action`` and decode its JSON answer (untyped: prefer the methods)."""
        answer = self.action(name, body)
        return json.loads(answer) if answer else None

    def _call(self, kind: type[T] | TypeAdapter[T], name: str, body: BaseModel) -> T:
        return _parse(kind, self.action(name, body), name)

    def close(self) -> None:
        """Close the connections (and those :meth:`at` opened)."""
        with self._lock:
            connections, self._connections = list(self._connections.values()), {}
            nodes, self._nodes = list(self._nodes.values()), {}
        for connection in connections:
            connection.close()
        for node in nodes:
            node.close()

    def __enter__(self) -> LavenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- datasets ------------------------------------------------------------------------

    def create_dataset(self, name: str, uid_column_name: str = "uid") -> Dataset:
        """Create an empty dataset whose samples are identified by ``uid_column_name``."""
        body = wire.build(
            wire.CreateDatasetBody, "arguments", name=name, uid_column_name=uid_column_name
        )
        return self._call(Dataset, "create_dataset", body)

    def get_dataset(self, dataset_id: str | None = None, name: str | None = None) -> Dataset:
        """A dataset with its shardsets, by id or by name."""
        body = wire.build(wire.GetDatasetBody, "arguments", dataset_id=dataset_id, name=name)
        return self._call(Dataset, "get_dataset", body)

    def list_datasets(self) -> list[Dataset]:
        """Every dataset on the server."""
        return self._call(_DATASETS, "list_datasets", wire.Empty())

    def delete_dataset(self, dataset_id: str, force: bool = False) -> wire.Deleted:
        """Delete a dataset and its iterations from the catalog (shard files stay in storage).

        A dataset with live iterations (streams open on any server) is refused with
        ``IterationBusy`` naming them; ``force=True`` ends them first (their readers get
        ``IterationNotFound``).
        """
        body = wire.build(wire.DeleteDatasetBody, "arguments", dataset_id=dataset_id, force=force)
        return self._call(wire.Deleted, "delete_dataset", body)

    # -- shardsets and shards ------------------------------------------------------------

    def create_shardset(
        self,
        dataset_id: str,
        location: str,
        columns: Sequence[ColumnOptions | Mapping[str, Any]] | None = None,
        is_main: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Shardset:
        """Add a shardset stored at ``location`` (a folder URL: ``file:///data/x``, ``s3://b/p``).

        Shards already there are checked and registered. Without ``columns``, they are
        inferred from the first shard found at the location.

        ``storage_options`` are the fsspec options of the location, laid over the server's
        defaults, e.g. ``{"key": ..., "secret": ..., "endpoint_url": "http://minio:9000"}``
        for ``s3://``. They are stored with the shardset; secrets among them (keys, secrets,
        tokens, passwords) are never shown back: the shardset's ``storage_options`` say
        ``"***"``.
        """
        body = wire.build(
            wire.CreateShardsetBody,
            "arguments",
            dataset_id=dataset_id,
            location=location,
            columns=[column_options(c) for c in columns] if columns is not None else None,
            is_main=is_main,
            storage_options=dict(storage_options) if storage_options is not None else None,
        )
        return self._call(Shardset, "create_shardset", body)

    def get_shardset(self, dataset_id: str, shardset_id: str) -> Shardset:
        """One shardset of a dataset."""
        body = wire.build(
            wire.ShardsetBody, "arguments", dataset_id=dataset_id, shardset_id=shardset_id
        )
        return self._call(Shardset, "get_shardset", body)

    def delete_shardset(
        self, dataset_id: str, shardset_id: str, force: bool = False
    ) -> wire.Deleted:
        """Remove a shardset from the catalog (its files stay in storage).

        One that live iterations read is refused with ``IterationBusy``; ``force=True``
        ends those iterations first (their readers get ``IterationNotFound``).
        """
        body = wire.build(
            wire.DeleteShardsetBody,
            "arguments",
            dataset_id=dataset_id,
            shardset_id=shardset_id,
            force=force,
        )
        return self._call(wire.Deleted, "delete_shardset", body)

    def list_shards(self, dataset_id: str, shardset_id: str) -> list[Shard]:
        """The shards of a shardset: file, rows, size, uid range."""
        body = wire.build(
            wire.ShardsetBody, "arguments", dataset_id=dataset_id, shardset_id=shardset_id
        )
        return self._call(_SHARDS, "list_shards", body)

    def sync_shardset(self, dataset_id: str, shardset_id: str) -> SyncResult:
        """Register shard files added at the shardset's location since the last sync."""
        body = wire.build(
            wire.ShardsetBody, "arguments", dataset_id=dataset_id, shardset_id=shardset_id
        )
        return self._call(SyncResult, "sync_shardset", body)

    def infer_columns(self, location: str) -> list[ColumnOptions]:
        """The columns of the first shard at ``location``: what ``create_shardset`` would infer.

        Raises ``ActionNotFound`` on a server without the ``infer_columns`` action.
        """
        body = wire.build(wire.LocationBody, "arguments", location=location)
        return self._call(_COLUMNS, "infer_columns", body)

    def write_shard(
        self,
        dataset_id: str,
        shardset_id: str,
        table: pa.Table,
        shard_index: int = 0,
        format: str = "parquet",
        overwrite: bool = False,
    ) -> Shard:
        """Write ``table`` as shard ``shard_index`` of a shardset (``do_put``) and register it.

        The server writes the file (the client never touches storage); ``Writer`` builds
        the table from samples and checks it against the declared columns first.
        """
        command = wire.build(
            wire.PutShardCommand,
            "write",
            dataset_id=dataset_id,
            shardset_id=shardset_id,
            shard_index=shard_index,
            format=format,
            overwrite=overwrite,
        )
        descriptor = flight.FlightDescriptor.for_command(wire.encode(command))

        def put(connection: flight.FlightClient) -> pa.Buffer | None:
            writer, answers = connection.do_put(descriptor, table.schema, self.options(None))
            try:
                writer.write_table(table)
                writer.done_writing()
                return answers.read()
            finally:
                writer.close()

        answer = self.failover(put)
        if answer is None:
            raise SchemaMismatch("the server did not confirm the shard")
        return _parse(Shard, answer.to_pybytes(), "do_put")

    # -- reading -------------------------------------------------------------------------

    def preview_dataset(
        self,
        dataset_id: str,
        offset: int = 0,
        limit: int = 10,
        columns: Sequence[str] | None = None,
        join: str = "left",
    ) -> pa.Table:
        """Rows ``offset .. offset + limit`` of a dataset, its shardsets joined, as a table.

        ``join="inner"`` leaves out the samples some shardset lacks (``left``: their values
        are null).
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
        answer = self.action("preview_dataset", body)
        with self.errors():
            return pa.ipc.open_stream(answer).read_all()

    def read_dataset(self, name: str, shardset_ids: Sequence[str] | None = None) -> pa.Table:
        """All rows of a dataset (by name or id) read over plain Flight, one endpoint at a time."""
        info = self.get_flight_info(flight.FlightDescriptor.for_path(name, *(shardset_ids or ())))
        tables = [self._read_endpoint(endpoint) for endpoint in info.endpoints]
        return pa.concat_tables(tables) if tables else info.schema.empty_table()

    def get_flight_info(self, descriptor: pa.flight.FlightDescriptor) -> pa.flight.FlightInfo:
        """``get_flight_info`` of a descriptor (with failover between the settings' URLs)."""
        return self.failover(lambda f: f.get_flight_info(descriptor, self.options()))

    def _read_endpoint(self, endpoint: pa.flight.FlightEndpoint) -> pa.Table:
        """An endpoint's rows, from its first location that answers (then from ours)."""
        urls = endpoint_locations(endpoint)
        if not urls:
            return self._read_ticket(endpoint.ticket)
        last: ServerUnavailable | None = None
        for url in urls:
            try:
                return self.at(url)._read_ticket(endpoint.ticket)
            except ServerUnavailable as exc:
                last = exc
        try:
            return self._read_ticket(endpoint.ticket)  # the servers we were told of
        except ServerUnavailable:
            assert last is not None
            raise last from None

    def read_shard(
        self,
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
        return self._read_ticket(flight.Ticket(wire.encode(ticket)))

    def _read_ticket(self, ticket: pa.flight.Ticket) -> pa.Table:
        return self.failover(lambda f: f.do_get(ticket, self.options(None)).read_all())

    # -- the server ----------------------------------------------------------------------

    def list_actions(self) -> list[tuple[str, str]]:
        """The server's actions and what each does."""
        return self.failover(
            lambda f: [(a.type, a.description) for a in f.list_actions(self.options())]
        )

    def list_plugins(self) -> wire.PluginList:
        """The server's plugins (kind, name, doc, parameters...) and the files that failed to load.

        Raises ``ActionNotFound`` on a server without the ``list_plugins`` action.
        """
        return self._call(wire.PluginList, "list_plugins", wire.Empty())

    # -- iterations ----------------------------------------------------------------------

    def get_iteration(self, iteration_id: str) -> IterationProgress:
        """Progress of an iteration: current, completed, filtered, failed, in flight per rank."""
        body = wire.build(IterationBody, "arguments", iteration_id=iteration_id)
        return self._call(IterationProgress, "get_iteration", body)

    def list_iterations(
        self,
        dataset_id: str | None = None,
        state: str | None = None,
        offset: int = 0,
        limit: int | None = None,
        ranks: bool = False,
    ) -> list[IterationProgress]:
        """Progress of the iterations (of one dataset), newest first.

        Args:
            dataset_id: Only this dataset's.
            state: ``"running"`` or ``"done"``: only those.
            offset: Skip that many (after the filters), for paging.
            limit: At most that many (default: every one).
            ranks: Add each rank's progress (``.ranks``).
        """
        body = wire.build(
            ListIterationsBody,
            "arguments",
            dataset_id=dataset_id,
            state=state,
            offset=offset,
            limit=limit,
            ranks=ranks,
        )
        return self._call(_PROGRESSES, "list_iterations", body)

    def delete_iteration(self, iteration_id: str, force: bool = False) -> wire.Deleted:
        """Forget an iteration and its progress.

        One with open streams (on any server) is refused with ``IterationBusy``;
        ``force=True`` ends them first (their readers get ``IterationNotFound``).
        """
        body = wire.build(DeleteIterationBody, "arguments", iteration_id=iteration_id, force=force)
        return self._call(wire.Deleted, "delete_iteration", body)

    def list_nodes(self) -> list[NodeInfo]:
        """The servers sharing this server's catalog: location, heartbeat, alive, streams.

        Raises ``ActionNotFound`` on a server without the ``list_nodes`` action.
        """
        return self._call(_NODES, "list_nodes", wire.Empty())

    def pushback(self, iteration_id: str) -> int:
        """Return every in-flight sample of an iteration to its queue; how many."""
        body = wire.build(IterationBody, "arguments", iteration_id=iteration_id)
        return self._call(wire.PushedBack, "pushback", body).pushed_back

    def set_mixture_weights(
        self, iteration_id: str, weights: Mapping[str, float], at: int | None = None
    ) -> WeightsSet:
        """Change a mixture's weights (by source dataset id) for every rank of it.

        They take effect at the first sample no rank has been handed yet (``at``: not
        before that sample of the epoch), in the epoch the ranks are in and the next ones;
        the answer says where (``epoch``, ``from_seq``) and the epoch's new ``total``.
        """
        body = wire.build(
            MixtureWeightsBody,
            "arguments",
            iteration_id=iteration_id,
            weights={str(k): float(v) for k, v in weights.items()},
            at=at,
        )
        return self._call(WeightsSet, "set_mixture_weights", body)
