"""``Iteration``: a training job's view of an iteration, iterable over batches, epoch by epoch.

An ``Iteration`` is lazy: ``from_dataset`` checks the spec with the server but creates
nothing there until the first batch is asked for (or ``.id`` is read), so the spawned
workers of a DataLoader, which run the script's top level again, create nothing.

Iterating it is one epoch: a ``for`` loop streams the rank's share of the epoch; the next
``for`` loop is the next epoch (shuffled anew, from a seed derived from the iteration's
seed and the epoch number); ``set_epoch(n)`` picks one explicitly. A new ``Iteration`` over
an existing iteration (``resume``, or ``from_dataset`` with its id) starts where the rank
is: the rest of its current epoch, or the next one when it is done; ``resume(...,
world_size=w)`` deals what is left to another number of ranks.

``from_mixture`` draws from several datasets by weight (``MixtureSource``); with
``batch_size=0`` an iteration yields single samples (dicts).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.flight as flight

from ..protocol import wire
from ..protocol.errors import InvalidArgument
from ..protocol.iterations import (
    BatchMetadata,
    IterationCommand,
    IterationInfo,
    IterationProgress,
    IterationSpec,
    IterationTicket,
    MixtureSourceSpec,
    PluginCall,
)
from . import api
from .acks import Acknowledger, acknowledging, acknowledging_samples
from .connection import LavenderClient, endpoint_locations
from .formats import check_format, samples
from .streams import stream_batches, stream_messages, stream_nodes

if TYPE_CHECKING:
    from .torch_loader import LavenderDataLoader

__all__ = [
    "Iteration",
    "MixtureSource",
    "PluginArg",
    "stream_batches",
    "stream_messages",
    "stream_nodes",
]

log = logging.getLogger(__name__)

PluginArg = str | tuple[str, dict[str, Any]] | dict[str, Any]
"""A plugin by name, or ``(name, params)``."""

_opened: dict[str, int] = {}


def _plugin(value: PluginArg) -> PluginCall:
    if isinstance(value, str):
        return PluginCall(name=value)
    if isinstance(value, tuple):
        name, params = value
        return PluginCall(name=name, params=params)
    return PluginCall.model_validate(value)


@dataclass(frozen=True)
class MixtureSource:
    """One source of ``Iteration.from_mixture``: a dataset, its weight, what to read of it.

    ``weight`` is relative (the weights need not add up to 1; 0 leaves the source out
    until ``set_mixture_weights`` gives it one). ``shardsets``, ``columns`` and ``filters``
    are ``from_dataset``'s, for this source alone; the sources' columns must agree.
    """

    dataset_id: str
    weight: float = 1.0
    shardsets: Sequence[str] | None = None
    columns: Sequence[str] | None = None
    filters: Sequence[PluginArg] | None = field(default=None)

    def spec(self) -> MixtureSourceSpec:
        """The wire form."""
        return wire.build(
            MixtureSourceSpec,
            "mixture source",
            dataset_id=self.dataset_id,
            weight=self.weight,
            shardsets=list(self.shardsets) if self.shardsets is not None else None,
            columns=list(self.columns) if self.columns is not None else None,
            filters=[_plugin(f) for f in self.filters or ()],
        )


def _distributed() -> Any | None:
    """``torch.distributed`` when it is initialized; never imports torch for it.

    A job under ``torch.distributed`` has imported torch to start its process group, so a
    program that has not gets nothing (and does not pay the import).
    """
    if "torch" not in sys.modules:
        return None
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def default_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: as given, else from ``torch.distributed``, else the environment."""
    if rank is not None and world_size is not None:
        return rank, world_size
    dist = _distributed()
    if dist is not None:
        found_rank, found_size = dist.get_rank(), dist.get_world_size()
    else:
        found_rank = int(os.environ.get("RANK", 0))
        found_size = int(os.environ.get("WORLD_SIZE", 1))
    return (found_rank if rank is None else rank), (
        found_size if world_size is None else world_size
    )


def _shared_iteration_id(spec: IterationSpec, rank: int) -> str:
    """The id every rank of a job computes alike, when the job did not name its iteration.

    Under ``torch.distributed``, rank 0 picks a fresh id and broadcasts it. Under torchrun
    (``TORCHELASTIC_RUN_ID``), the id is the run id, the spec and how many iterations of
    that spec this process opened before: ranks call ``from_dataset`` in the same order, and
    a rank restarted by torchrun rejoins (resumes) the iteration it was in.
    """
    digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]
    dist = _distributed()
    if dist is not None:
        chosen = [f"it-{os.urandom(6).hex()}" if rank == 0 else ""]
        dist.broadcast_object_list(chosen, src=0)
        return str(chosen[0])
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id:
        count = _opened.get(digest, 0)
        _opened[digest] = count + 1
        return f"{run_id}-{digest}-{count}"[:128]
    raise InvalidArgument(
        f"world_size={spec.world_size} needs iteration_id=... (a name the job chooses, the same "
        "on every rank, e.g. 'run7') so its ranks join one iteration; under torchrun or "
        "torch.distributed it is chosen for you"
    )


class Iteration:
    """Batches of one rank of an iteration, epoch after epoch (see the module docstring).

    Create with ``from_dataset`` or ``resume``. A batch counts as completed when the next
    one is asked for (or the loop ends); what the loop takes and completes reaches the
    server in bulk from a background thread.
    """

    acknowledger_class: ClassVar[type[Acknowledger]] = Acknowledger
    """What reports a loop's batches (a subclass may record them, as a test does)."""

    def __init__(
        self,
        command: IterationCommand,
        rank: int,
        format: str = "python",
        progress: bool = False,
        client: LavenderClient | None = None,
    ) -> None:
        self._command = command
        self.rank = rank
        self.format = check_format(format)
        self.progress = progress
        self._client = client
        self._info: IterationInfo | None = None
        self._row_bytes: float | None = None
        self._schema: pa.Schema | None = None
        self._ticket: IterationTicket | None = None
        self._locations: list[str] = []
        self._epoch: int | None = None
        self._requested: int | None = None
        self.session = secrets.token_hex(8)
        """This object's streams' session: its reconnects take over its own streams only."""
        self.takeover = False
        """Whether its streams end the rank's streams of other sessions (``resume`` sets it)."""

    # -- on the server -------------------------------------------------------------------

    @property
    def client(self) -> LavenderClient:
        """The connection this iteration uses (the default one unless given)."""
        if self._client is None:
            self._client = api.get_client()
        return self._client

    def _ensure(self) -> IterationInfo:
        """Create (or join, or reopen) the iteration on the server, once."""
        if self._info is None:
            client = self.client
            descriptor = flight.FlightDescriptor.for_command(wire.encode(self._command))
            info = client.get_flight_info(descriptor)
            found = IterationInfo.model_validate_json(info.app_metadata)
            world = found.world_size or found.spec.world_size
            if not 0 <= self.rank < world:
                raise InvalidArgument(
                    f"rank {self.rank} is outside iteration {found.iteration_id}'s world of {world}"
                )
            endpoint = info.endpoints[self.rank]  # the server's ticket for this rank
            self._ticket = IterationTicket.model_validate_json(endpoint.ticket.ticket)
            self._locations = stream_nodes(client, endpoint_locations(endpoint))
            self._schema = info.schema
            self._row_bytes = (
                info.total_bytes / info.total_records
                if info.total_bytes > 0 and info.total_records > 0
                else None
            )
            self._info = found
        return self._info

    @property
    def id(self) -> str:
        """The iteration's id (creating it on the server if it is not there yet)."""
        return self._ensure().iteration_id

    @property
    def row_bytes(self) -> float | None:
        """About how many bytes a row takes as read, by the server's estimate.

        From the FlightInfo's ``total_bytes`` over its ``total_records``; None when the
        server does not say (a mixture, or a server older than the estimate).
        """
        self._ensure()
        return self._row_bytes

    @property
    def locations(self) -> list[str]:
        """The servers that may stream this rank, in the order they are tried.

        The rank's endpoint's locations (the live servers on the catalog, this rank's first),
        then the client's own URLs.
        """
        self._ensure()
        return list(self._locations)

    @property
    def spec(self) -> IterationSpec:
        """What the iteration delivers."""
        return self._ensure().spec

    @property
    def seed(self) -> int:
        """The shuffle seed in use (chosen by the server when the spec gave none)."""
        return self._ensure().seed

    @property
    def schema(self) -> pa.Schema:
        """The schema of its batches."""
        self._ensure()
        assert self._schema is not None
        return self._schema

    @property
    def epoch(self) -> int | None:
        """The epoch the last (or current) loop iterates; None before the first."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next loop iterate epoch ``epoch`` (as torch's ``DistributedSampler``)."""
        if epoch < 0:
            raise InvalidArgument(f"epochs are numbered from 0, got {epoch}")
        self._requested = epoch

    def next_epoch(self) -> int:
        """The epoch the next loop iterates (and take it as the current one).

        ``set_epoch``'s, else the one after the last loop's, else where the rank stands:
        its current epoch, or the next when it is done.
        """
        if self._requested is not None:
            epoch, self._requested = self._requested, None
        elif self._epoch is not None:
            epoch = self._epoch + 1
        else:
            asked = self._info is None
            if asked and self._ensure().created:  # this call made it: every rank at epoch 0
                epoch = 0
            else:
                rank = self.get_progress().ranks[self.rank]
                # a rank that finished its epoch goes on with the next (an empty one stays)
                epoch = rank.epoch + 1 if rank.done and rank.current else rank.epoch
        self._epoch = epoch
        return epoch

    def ticket(self, epoch: int, worker: int = 0, num_workers: int = 1) -> IterationTicket:
        """The ticket of one stream of this rank: the server's, for an epoch and worker."""
        self._ensure()
        assert self._ticket is not None
        return self._ticket.model_copy(
            update={
                "epoch": epoch,
                "worker": worker,
                "num_workers": num_workers,
                "window": True,
                "session": self.session,
                "takeover": self.takeover,
            }
        )

    # -- creating ------------------------------------------------------------------------

    @classmethod
    def from_dataset(
        cls,
        dataset_id: str,
        shardsets: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        *,
        batch_size: int,
        shuffle: bool = False,
        shuffle_seed: int | None = None,
        shuffle_block_size: int = 4,
        drop_last: bool = False,
        epochs: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        replication_pg: Sequence[Sequence[int]] | None = None,
        filters: Sequence[PluginArg] | None = None,
        collater: PluginArg | None = None,
        preprocessors: Sequence[PluginArg] | None = None,
        categorizer: PluginArg | None = None,
        max_retry_count: int = 0,
        skip_on_failure: bool = False,
        join: str = "left",
        iteration_id: str | None = None,
        format: str = "python",
        progress: bool = False,
        client: LavenderClient | None = None,
    ) -> Iteration:
        """An iteration over a dataset, or the one ``iteration_id`` names (joined).

        The spec is checked with the server at once (a typo in a column or plugin fails
        here), but nothing is created until the first batch is asked for. Ranks of one
        job pass the same arguments (and ``iteration_id``, unless ``torch.distributed`` or
        torchrun can choose it): the first to start creates the iteration, the others join
        it. Without an id and with one rank, every call makes a new iteration.

        ``epochs``: how many passes (None: as many as the loop makes; each ``for`` over
        the iteration is the next epoch). ``drop_last=True`` gives every rank the same
        number of full batches (DDP-safe). ``shardsets`` and ``columns`` choose what is
        read. ``join="left"`` keeps every sample of the main shardset (columns a feature
        shardset lacks are null); ``join="inner"`` keeps those present in every selected
        shardset, and counts the others as filtered.

        ``batch_size=0`` yields single samples (dicts), for loaders that batch themselves
        (the server sends and the client acknowledges them in groups of ``SAMPLE_GROUP``).
        ``categorizer=("bucket", {"column": "text", "boundaries": [64, 256]})``: every batch
        holds samples of one category (each stream makes at most one partial batch per
        category; none with ``drop_last``).
        """
        return cls._create(
            client,
            rank,
            iteration_id,
            format,
            progress,
            dataset_id=dataset_id,
            shardsets=list(shardsets) if shardsets is not None else None,
            columns=list(columns) if columns is not None else None,
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=shuffle_seed,
            shuffle_block_size=shuffle_block_size,
            drop_last=drop_last,
            epochs=epochs,
            world_size=world_size,
            replication_pg=replication_pg,
            filters=[_plugin(f) for f in filters or ()],
            collater=_plugin(collater) if collater is not None else None,
            preprocessors=[_plugin(p) for p in preprocessors or ()],
            categorizer=_plugin(categorizer) if categorizer is not None else None,
            max_retry_count=max_retry_count,
            skip_on_failure=skip_on_failure,
            join=join,
        )

    @classmethod
    def _create(
        cls,
        client: LavenderClient | None,
        rank: int | None,
        iteration_id: str | None,
        format: str,
        progress: bool,
        **fields: Any,
    ) -> Iteration:
        """Build and check a spec, then the (lazy) iteration of this rank."""
        rank, world_size = default_world(rank, fields.pop("world_size"))
        groups = fields.pop("replication_pg")
        spec = wire.build(
            IterationSpec,
            "iteration",
            world_size=world_size,
            replication_pg=[list(g) for g in groups] if groups else None,
            **fields,
        )
        if not 0 <= rank < world_size:
            raise InvalidArgument(f"rank {rank} is outside the world of {world_size}")
        if iteration_id is None and world_size > 1:
            iteration_id = _shared_iteration_id(spec, rank)
        command = wire.build(IterationCommand, "iteration", iteration_id=iteration_id, spec=spec)
        client = client or api.get_client()
        client.action("check_iteration", command)  # fails now on a typo; creates nothing
        return cls(command, rank, format, progress, client)

    @classmethod
    def from_mixture(
        cls,
        sources: Sequence[MixtureSource],
        *,
        batch_size: int,
        shuffle: bool = True,
        shuffle_seed: int | None = None,
        shuffle_block_size: int = 4,
        on_exhausted: str = "stop",
        source_column: str | None = None,
        drop_last: bool = False,
        epochs: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        replication_pg: Sequence[Sequence[int]] | None = None,
        collater: PluginArg | None = None,
        preprocessors: Sequence[PluginArg] | None = None,
        categorizer: PluginArg | None = None,
        max_retry_count: int = 0,
        skip_on_failure: bool = False,
        join: str = "left",
        iteration_id: str | None = None,
        format: str = "python",
        progress: bool = False,
        client: LavenderClient | None = None,
    ) -> Iteration:
        """An iteration drawing from several datasets by weight, sample by sample.

        Each sample is drawn from a source chosen by the weights (deterministic for a
        seed; each source is shuffled as ``from_dataset`` shuffles it). The sources must
        give the same columns (checked here, naming the source and column that differ).
        ``on_exhausted``: when a source runs out, ``"stop"`` ends the epoch, ``"cycle"``
        starts that source's next (reshuffled) pass (the epoch ends when every source
        completed one), ``"rebalance"`` goes on with the others, their weights
        renormalized (the epoch ends when all ran out). ``source_column="source"`` adds a
        column holding each row's source dataset id. ``lavender.set_mixture_weights``
        changes the weights while it runs. The other options are ``from_dataset``'s.
        """
        found = list(sources)
        if not found or not all(isinstance(s, MixtureSource) for s in found):
            raise InvalidArgument(
                "from_mixture takes a list of MixtureSource(dataset_id=..., weight=...)"
            )
        return cls._create(
            client,
            rank,
            iteration_id,
            format,
            progress,
            dataset_id=found[0].dataset_id,
            mixture=[s.spec() for s in found],
            on_exhausted=on_exhausted,
            source_column=source_column,
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=shuffle_seed,
            shuffle_block_size=shuffle_block_size,
            drop_last=drop_last,
            epochs=epochs,
            world_size=world_size,
            replication_pg=replication_pg,
            collater=_plugin(collater) if collater is not None else None,
            preprocessors=[_plugin(p) for p in preprocessors or ()],
            categorizer=_plugin(categorizer) if categorizer is not None else None,
            max_retry_count=max_retry_count,
            skip_on_failure=skip_on_failure,
            join=join,
        )

    @classmethod
    def resume(
        cls,
        iteration_id: str,
        rank: int | None = None,
        format: str = "python",
        progress: bool = False,
        client: LavenderClient | None = None,
        world_size: int | None = None,
    ) -> Iteration:
        """Continue an iteration (after a crash, a restart, or in another process).

        The first loop delivers the rest of the rank's current epoch (or the next epoch
        when that one is done). ``world_size`` other than the iteration's (every rank of
        the new world passes the same): what is not completed, what the old ranks held in
        flight included, is dealt anew to ``world_size`` ranks, their shares within one
        batch of each other (equal with ``drop_last``), nothing completed delivered again.
        It takes the rank over: streams of the rank that another ``Iteration`` object still
        has open (a loop that hangs, an older process) end, and what they held is delivered
        here. (Two objects made with ``from_dataset`` on one rank share its samples instead,
        each getting a part.)
        """
        rank, _ = default_world(rank, None)
        command = wire.build(
            IterationCommand, "iteration", iteration_id=iteration_id, world_size=world_size
        )
        iteration = cls(command, rank, format, progress, client)
        iteration.takeover = True
        iteration._ensure()  # a wrong id fails here
        return iteration

    # -- progress ------------------------------------------------------------------------

    def get_progress(self) -> IterationProgress:
        """Where the iteration stands, every rank included."""
        return self.client.get_iteration(self.id)

    def rank_total(self) -> int:
        """Samples this rank delivers in an epoch."""
        return self.get_progress().ranks[self.rank].total

    def __len__(self) -> int:
        """Batches this rank delivers in a full epoch (samples, with ``batch_size=0``)."""
        if self.spec.batch_size == 0:
            return self.rank_total()
        return -(-self.rank_total() // self.spec.batch_size)

    # -- iterating -----------------------------------------------------------------------

    def acknowledger(self, epoch: int) -> Acknowledger:
        """The reporter of one loop over ``epoch``: to the rank's first server, then the others."""
        nodes = [self.client.at(url) for url in self.locations]
        return self.acknowledger_class(
            nodes[0],
            self.id,
            self.rank,
            epoch,
            reconnect_seconds=self.client.settings.reconnect_seconds,
            fallbacks=nodes[1:],
        )

    def batches(
        self, ticket: IterationTicket, acks: Acknowledger, format: str | None = None
    ) -> Iterator[tuple[Any, list[tuple[int, int]]]]:
        """The batches of one stream and their seq ranges, as they come (repeats included).

        The stream moves to the next server of the rank when its own goes away; the reports
        follow it. ``format``: the batches' (default: the iteration's).
        """

        def learn(metadata: BatchMetadata) -> None:
            if metadata.report_every:
                acks.report_every = metadata.report_every
            acks.deal = metadata.deal

        def flush() -> None:
            try:
                acks.flush()
            except Exception:  # still down; the reopen that follows tells
                pass

        return stream_batches(
            self.client, ticket, format or self.format, learn, flush, self.locations, acks.follow
        )

    def __iter__(self) -> Iterator[Any]:
        epoch = self.next_epoch()
        ticket = self.ticket(epoch)
        acks = self.acknowledger(epoch)
        single = self.spec.batch_size == 0
        # single samples: a group is taken when its first sample is yielded, completed
        # when the sample after its last is asked for
        fmt = "arrow" if single and self.format == "python" else self.format
        items = self.batches(ticket, acks, fmt)
        if not self.progress:
            if single:
                yield from acknowledging_samples(items, acks, samples)
                return
            yield from acknowledging(items, acks)
            return
        from tqdm.auto import tqdm

        state = self.get_progress().ranks[self.rank]
        start = state.completed if state.epoch == epoch else 0
        with tqdm(
            total=state.total, initial=start, unit="samples", desc=f"{self.id} epoch {epoch}"
        ) as bar:

            def counted() -> Iterator[tuple[Any, list[tuple[int, int]]]]:
                for batch, seq in items:
                    bar.update(sum(b - a for a, b in seq))
                    yield batch, seq

            if single:
                yield from acknowledging_samples(counted(), acks, samples)
                return
            yield from acknowledging(counted(), acks)

    def to_torch_dataloader(
        self,
        prefetch_factor: int | None = None,
        pin_memory: bool = False,
        pin_memory_device: str = "",
        num_workers: int = 0,
        multiprocessing_context: str | None = None,
        timeout: float = 0,
        persistent_workers: bool | None = None,
        worker_batches: int | None = None,
    ) -> LavenderDataLoader:
        """A torch ``DataLoader`` over this rank's batches (``python`` format becomes ``torch``).

        Each worker opens its own Flight connection and streams its share of the rank's
        batches (never a copy); workers start with ``spawn`` by default, since gRPC does not
        survive ``fork``, and stay for the next epochs (``persistent_workers``, default on
        with workers). Iterating the loader again is the next epoch, as with the iteration.

        ``worker_batches``: the workers take the rank's batches in runs of this many (worker
        ``w`` runs ``w``, ``w + n``, ...), and the loop takes a run from each in turn: the
        order of a loop without workers whatever the run. Runs longer than one let the
        server send a worker's rows as they lie, without gathering every other batch into
        a message, and keep the rank's state a range per run (with 2 workers, 1M rows of
        100-byte text, runs of 16: a third less server CPU per epoch); the loop then holds
        up to a run of the other workers' batches while it takes one worker's. By default
        (None) a run weighs about one Flight message (4 MiB) by the server's estimate of a
        row, at most 16 batches: 16 for 1024-row batches of text, 1 for batches of many MB.
        """
        from .torch_loader import LavenderDataLoader

        return LavenderDataLoader(
            self,
            prefetch_factor=prefetch_factor,
            pin_memory=pin_memory,
            pin_memory_device=pin_memory_device,
            num_workers=num_workers,
            multiprocessing_context=multiprocessing_context,
            timeout=timeout,
            persistent_workers=persistent_workers,
            worker_batches=worker_batches,
        )
