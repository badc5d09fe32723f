"""The Flight protocol layer: decode a request, call one service method, encode the answer."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
from pydantic import BaseModel

from ..protocol import Dataset, wire
from ..protocol.errors import ActionNotFound, InvalidRequest, LavenderError
from ..protocol.iterations import (
    AckBody,
    DeleteIterationBody,
    IterationBody,
    IterationCommand,
    IterationTicket,
    ListIterationsBody,
    MixtureWeightsBody,
    NodeInfo,
    decode_ticket,
)
from ..transforms import Plugins
from .engine import IterationManager, LiveIteration, ReadAhead
from .errors import translate_errors, wire_errors
from .service import LavenderService

__all__ = ["ACTIONS", "LavenderFlightServer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActionSpec:
    """One ``do_action`` verb: its body model, what it does, and how to run it."""

    body: type[BaseModel]
    description: str
    run: Callable[[LavenderFlightServer, Any], bytes]


def _json(value: Any) -> bytes:
    if isinstance(value, BaseModel):
        return value.model_dump_json(by_alias=True).encode()
    if isinstance(value, list):
        return json.dumps([v.model_dump(mode="json", by_alias=True) for v in value]).encode()
    return json.dumps(value).encode()


def _deleted(delete: Callable[..., None], *ids: str) -> bytes:
    delete(*ids)
    return _json(wire.Deleted(deleted=ids[-1]))


def _nodes(srv: LavenderFlightServer) -> list[NodeInfo]:
    """Every server registered on the catalog, alive when its heartbeat is recent."""
    limit = time.time() - srv.iterations.node_timeout
    found = []
    for node in srv.service.catalog.list_nodes():
        try:
            info = json.loads(node.info or "{}")
        except ValueError:
            info = {}
        info = info if isinstance(info, dict) else {}
        found.append(
            NodeInfo(
                id=node.id,
                location=node.location,
                started_at=node.started_at,
                heartbeat_at=node.heartbeat_at,
                alive=node.heartbeat_at >= limit,
                streams=int(info.get("streams") or 0),
                samples_per_s=float(info.get("samples_per_s") or 0.0),
            )
        )
    return found


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


ACTIONS: dict[str, ActionSpec] = {
    "create_dataset": ActionSpec(
        wire.CreateDatasetBody,
        "Create a dataset {name, uid_column_name}; answers the dataset as JSON.",
        lambda srv, b: _json(srv.service.create_dataset(b.name, b.uid_column_name)),
    ),
    "get_dataset": ActionSpec(
        wire.GetDatasetBody,
        "Get a dataset {dataset_id | name} with its shardsets, as JSON.",
        lambda srv, b: _json(srv.service.get_dataset(dataset_id=b.dataset_id, name=b.name)),
    ),
    "list_datasets": ActionSpec(
        wire.Empty,
        "List every dataset with its shardsets, as a JSON array.",
        lambda srv, b: _json(srv.service.list_datasets()),
    ),
    "delete_dataset": ActionSpec(
        wire.DeleteDatasetBody,
        "Delete a dataset {dataset_id, force?: false} and its iterations from the catalog "
        "(shard files stay); one with live iterations only with force, which ends them "
        "first (their readers get IterationNotFound).",
        lambda srv, b: _deleted(lambda d: srv.iterations.delete_dataset(d, b.force), b.dataset_id),
    ),
    "create_shardset": ActionSpec(
        wire.CreateShardsetBody,
        "Add a shardset {dataset_id, location, columns?, is_main?, storage_options?}; shards "
        "found there are checked and registered; columns are inferred from the first shard "
        "when omitted; secrets in storage_options are never shown back.",
        lambda srv, b: _json(
            srv.service.create_shardset(
                b.dataset_id, b.location, b.columns, b.is_main, b.storage_options
            )
        ),
    ),
    "infer_columns": ActionSpec(
        wire.LocationBody,
        "The columns of the first shard file at a location {location}, as a JSON array of "
        "{name, type, description}: what create_shardset would infer.",
        lambda srv, b: _json(srv.service.infer_columns(b.location)),
    ),
    "get_shardset": ActionSpec(
        wire.ShardsetBody,
        "Get a shardset {dataset_id, shardset_id}, as JSON.",
        lambda srv, b: _json(srv.service.get_shardset(b.dataset_id, b.shardset_id)),
    ),
    "delete_shardset": ActionSpec(
        wire.DeleteShardsetBody,
        "Remove a shardset {dataset_id, shardset_id, force?: false} from the catalog (files "
        "stay); one that live iterations read only with force, which ends them first "
        "(their readers get IterationNotFound).",
        lambda srv, b: _deleted(
            lambda d, s: srv.iterations.delete_shardset(d, s, b.force),
            b.dataset_id,
            b.shardset_id,
        ),
    ),
    "list_shards": ActionSpec(
        wire.ShardsetBody,
        "List the shards of a shardset {dataset_id, shardset_id}, as a JSON array.",
        lambda srv, b: _json(srv.service.list_shards(b.dataset_id, b.shardset_id)),
    ),
    "sync_shardset": ActionSpec(
        wire.ShardsetBody,
        "Register new shard files at a shardset's location, re-read changed ones, drop "
        "vanished ones {dataset_id, shardset_id}; answers what it found.",
        lambda srv, b: _json(srv.service.sync_shardset(b.dataset_id, b.shardset_id)),
    ),
    "preview_dataset": ActionSpec(
        wire.PreviewBody,
        "Joined rows {dataset_id, offset, limit, columns?, join?: left|inner}; answers an "
        "Arrow IPC stream.",
        lambda srv, b: _ipc(
            srv.service.preview_dataset(b.dataset_id, b.offset, b.limit, b.columns, b.join)
        ),
    ),
    "list_plugins": ActionSpec(
        wire.Empty,
        "Every filter, collater and preprocessor: kind, name, doc line, parameters, source; "
        "and the module files that failed to load. As JSON.",
        lambda srv, b: _json(
            wire.PluginList(
                plugins=[
                    wire.PluginDescription.model_validate(dataclasses.asdict(p))
                    for p in srv.plugins.describe()
                ],
                problems=srv.plugins.problems,
            )
        ),
    ),
    "check_iteration": ActionSpec(
        IterationCommand,
        "Check an iteration command {iteration_id?, spec?} as get_flight_info would, creating "
        "nothing; answers {exists, total} (samples per epoch).",
        lambda srv, b: _json(srv.iterations.check(b)),
    ),
    "get_iteration": ActionSpec(
        IterationBody,
        "Progress of an iteration {iteration_id}: current, completed, filtered, failed, the "
        "positions in flight per rank; as JSON.",
        lambda srv, b: _json(srv.iterations.progress(b.iteration_id, ranks=True)),
    ),
    "list_iterations": ActionSpec(
        ListIterationsBody,
        "Progress of the iterations {dataset_id?, ranks?: false, state?: running|done, "
        "offset?: 0, limit?}, newest first; as a JSON array (each rank's progress only "
        "with ranks=true; every iteration unless limit).",
        lambda srv, b: _json(
            srv.iterations.list(b.dataset_id, b.ranks, b.offset, b.limit, b.state)
        ),
    ),
    "list_nodes": ActionSpec(
        wire.Empty,
        "The servers sharing this catalog: id, location, started_at, heartbeat_at, alive, "
        "streams, samples_per_s; as a JSON array.",
        lambda srv, b: _json(_nodes(srv)),
    ),
    "ack": ActionSpec(
        AckBody,
        "Report what a rank's loop took and completed {iteration_id, rank, epoch?, taken: "
        "[[start, stop], ...], completed: [...]} (the 'seq' ranges of batch metadata; 'seq' "
        "is accepted for completed); saved before the answer {completed: new samples}.",
        lambda srv, b: _json(wire.Acked(completed=srv.iterations.get(b.iteration_id).ack(b))),
    ),
    "pushback": ActionSpec(
        IterationBody,
        "Return every in-flight sample of an iteration {iteration_id} to its queue; "
        "answers {pushed_back: samples}.",
        lambda srv, b: _json(
            wire.PushedBack(pushed_back=srv.iterations.get(b.iteration_id).pushback())
        ),
    ),
    "set_mixture_weights": ActionSpec(
        MixtureWeightsBody,
        "Change a mixture's weights {iteration_id, weights: {dataset_id: weight}, at?} for "
        "every rank, from the first seq no rank was handed yet; answers {epoch, from_seq, "
        "weights, total}.",
        lambda srv, b: _json(
            srv.iterations.get(b.iteration_id).set_mixture_weights(b.weights, b.at)
        ),
    ),
    "delete_iteration": ActionSpec(
        DeleteIterationBody,
        "Forget an iteration {iteration_id, force?: false} and its progress; one with open "
        "streams only with force (its readers then get IterationNotFound).",
        lambda srv, b: _deleted(lambda i: srv.iterations.delete(i, b.force), b.iteration_id),
    ),
}


@dataclass(frozen=True)
class _PutBody:
    """A ``do_put`` stream as the service reads it: the schema, then batches on demand."""

    reader: flight.MetadataRecordBatchReader

    @property
    def schema(self) -> pa.Schema:
        return self.reader.schema

    def batches(self) -> Iterator[pa.RecordBatch]:
        while True:
            try:
                chunk = self.reader.read_chunk()
            except StopIteration:
                return
            if chunk.data is not None:
                yield chunk.data


class LavenderFlightServer(flight.FlightServerBase):
    """Lavender Flight on the wire: plain Arrow Flight any Flight client can speak."""

    service: LavenderService
    iterations: IterationManager
    plugins: Plugins

    def __init__(
        self,
        service: LavenderService,
        location: str = "grpc://127.0.0.1:0",
        plugins: Plugins | None = None,
        workers: int = 0,
        lease_seconds: float | None = None,
        advertise: str | None = None,
        node_timeout: float = 10.0,
        read_ahead: ReadAhead | None = None,
        **kwargs: Any,
    ):
        """Listen on ``location``.

        ``kwargs`` go to ``FlightServerBase`` (``middleware``, ``tls_certificates``...);
        ``lease_seconds`` frees the samples held by streams whose server is cut off;
        ``advertise`` is the URL clients reach this server at (default: ``location`` with
        the port it got); ``node_timeout``: seconds without a heartbeat after which a
        server on the same catalog counts as dead; ``read_ahead``: the budget of windowed
        streams.
        """
        super().__init__(location, **kwargs)
        self.service = service
        self.plugins = plugins or Plugins.load(entry_points=False)
        scheme, _, rest = location.partition("://")
        host = rest.rsplit(":", 1)[0] if ":" in rest else rest
        if host in ("0.0.0.0", "::", "[::]", ""):  # every address: clients need a name
            host = socket.getfqdn()
        self.iterations = IterationManager(
            service.catalog,
            service,
            self.plugins,
            workers,
            lease_seconds=lease_seconds,
            location=advertise or f"{scheme}://{host}:{self.port}",
            node_timeout=node_timeout,
            budget=read_ahead,
        )
        self.iterations.start()

    def shutdown(self) -> None:
        """Stop serving, then stop the read threads and preprocessing workers."""
        super().shutdown()
        self.iterations.close()

    # -- discovery -----------------------------------------------------------------------

    def _spread(self, index: int, nodes: list[str]) -> list[flight.Location]:
        """Endpoint ``index``'s locations: every live server, starting at ``index`` % n.

        So rank r (or shard r) is served first by server r % n, and any of them can serve
        it when that one is gone. Every server answers the same order (the catalog's).
        """
        if not nodes:
            return []
        start = index % len(nodes)
        return [flight.Location(url) for url in nodes[start:] + nodes[:start]]

    def _flight_info(
        self,
        dataset: Dataset,
        descriptor: flight.FlightDescriptor,
        shardset_ids: list[str] | None = None,
        nodes: list[str] | None = None,
    ) -> flight.FlightInfo:
        self.service.check_readable(dataset)
        reader = self.service.reader(dataset, shardset_ids)
        nodes = self.iterations.live_locations() if nodes is None else nodes
        endpoints = [
            flight.FlightEndpoint(
                wire.encode(
                    wire.ShardTicket(
                        dataset_id=dataset.id, shard_index=shard.index, shardset_ids=shardset_ids
                    )
                ),
                self._spread(number, nodes),
            )
            for number, shard in enumerate(reader.main_shards)
        ]
        total_bytes = sum(view.shardset.total_bytes for view in reader.views)
        return flight.FlightInfo(
            reader.schema, descriptor, endpoints, reader.total_rows, total_bytes
        )

    def _iteration_info(
        self, live: LiveIteration, descriptor: flight.FlightDescriptor, created: bool
    ) -> flight.FlightInfo:
        nodes = self.iterations.live_locations()
        # one look at the catalog for a resize; none for an iteration this call created
        world_size = live.views.world_now if created else live.world_size
        endpoints = [
            flight.FlightEndpoint(
                wire.encode(IterationTicket(iteration_id=live.id, rank=rank)),
                self._spread(rank, nodes),
            )
            for rank in range(world_size)
        ]
        # an epoch's bytes as read, by the largest shards' footers (-1: not known): what a
        # client sizes by (a DataLoader's runs of batches), in Flight's own field
        row_bytes = live.setup.row_bytes
        total_bytes = round(row_bytes * live.setup.total) if row_bytes is not None else -1
        return flight.FlightInfo(
            live.output_schema,
            descriptor,
            endpoints,
            live.setup.total,
            total_bytes,
            app_metadata=wire.encode(live.info(world_size, created)),
        )

    @translate_errors
    def list_flights(
        self, context: flight.ServerCallContext, criteria: bytes
    ) -> Iterator[flight.FlightInfo]:
        """One FlightInfo per dataset, descriptor path ``[dataset name]``.

        A dataset with no shardset yet is listed empty (no columns, no endpoints, no rows);
        one that cannot be opened now (say, its location was refused) is left out, and the
        others are still listed.
        """
        nodes = self.iterations.live_locations()
        infos = []
        for dataset in self.service.list_datasets():
            descriptor = flight.FlightDescriptor.for_path(dataset.name)
            if dataset.main_shardset is None:
                infos.append(flight.FlightInfo(pa.schema([]), descriptor, [], 0, 0))
                continue
            try:
                infos.append(self._flight_info(dataset, descriptor, None, nodes))
            except LavenderError as exc:
                log.info("list_flights leaves out dataset %s: %s", dataset.name, exc)
        return iter(infos)

    @translate_errors
    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        """Path ``[dataset]`` or ``[dataset, shardset_id...]``: endpoints, one per main shard.

        Command ``IterationCommand``: creates, joins or reopens an iteration; one endpoint
        per rank. Every endpoint lists the live servers on the catalog (their advertised
        URLs), endpoint i first at server i % n: ranks and shards spread over the servers,
        and a client whose server went away goes on at the next location.
        """
        if descriptor.descriptor_type == flight.DescriptorType.CMD:
            command = wire.decode(IterationCommand, descriptor.command, "command")
            live, created = self.iterations.opened(command)
            return self._iteration_info(live, descriptor, created)
        if descriptor.descriptor_type != flight.DescriptorType.PATH or not descriptor.path:
            raise InvalidRequest(
                "get_flight_info takes a path descriptor [dataset name or id, shardset ids...]"
            )
        parts = [p.decode() if isinstance(p, bytes) else p for p in descriptor.path]
        dataset = self.service.find_dataset(parts[0])
        return self._flight_info(dataset, descriptor, parts[1:] or None)

    # -- data ----------------------------------------------------------------------------

    @translate_errors
    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.FlightDataStream:
        """Stream an iteration's rank, or one main shard of a dataset joined with the others."""
        request = decode_ticket(ticket.ticket)
        if isinstance(request, IterationTicket):
            live = self.iterations.get(request.iteration_id)
            schema, stream = live.stream(request, context.is_cancelled)

            def iteration_batches() -> Iterator[tuple[pa.RecordBatch, pa.Buffer]]:
                with wire_errors():
                    yield from stream

            return flight.GeneratorStream(schema, iteration_batches())
        dataset = self.service.get_dataset(dataset_id=request.dataset_id)
        reader = self.service.reader(dataset, request.shardset_ids, request.columns, request.join)
        shard = reader.main_shard(request.shard_index)

        def batches() -> Iterator[pa.RecordBatch]:
            with wire_errors():
                yield from reader.read(shard).to_batches()

        return flight.GeneratorStream(reader.schema, batches())

    @translate_errors
    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        """Write one shard: command ``PutShardCommand`` or path ``[dataset, shardset, index]``.

        The target and the columns are checked before the body is read; the body is then
        read batch by batch, and refused once it passes the server's shard size limit.
        """
        command = self._put_command(descriptor)
        shard = self.service.write_upload(
            command.dataset_id,
            command.shardset_id,
            command.shard_index,
            _PutBody(reader),
            command.format,
            command.overwrite,
        )
        writer.write(pa.py_buffer(_json(shard)))

    @staticmethod
    def _put_command(descriptor: flight.FlightDescriptor) -> wire.PutShardCommand:
        if descriptor.descriptor_type == flight.DescriptorType.CMD:
            return wire.decode(wire.PutShardCommand, descriptor.command, "put command")
        parts = [p.decode() if isinstance(p, bytes) else p for p in descriptor.path or []]
        if len(parts) not in (3, 4) or not parts[2].isdigit():
            raise InvalidRequest(
                "do_put takes a path [dataset_id, shardset_id, shard_index(, format)] or a "
                "PutShardCommand JSON command"
            )
        return wire.PutShardCommand(
            dataset_id=parts[0],
            shardset_id=parts[1],
            shard_index=int(parts[2]),
            format=parts[3] if len(parts) == 4 else "parquet",
        )

    # -- actions -------------------------------------------------------------------------

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        """Every action with a one-line description of its body and answer."""
        return [(name, spec.description) for name, spec in ACTIONS.items()]

    @translate_errors
    def do_action(
        self, context: flight.ServerCallContext, action: flight.Action
    ) -> Iterator[bytes]:
        """Run one management action; its body and answer are JSON (preview: Arrow IPC)."""
        spec = ACTIONS.get(action.type)
        if spec is None:
            raise ActionNotFound(
                f"no action {action.type!r}; actions: {', '.join(sorted(ACTIONS))}"
            )
        body = wire.decode(
            spec.body, action.body.to_pybytes() if action.body else b"", f"{action.type} body"
        )
        return iter([spec.run(self, body)])
