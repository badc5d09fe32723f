"""``Iteration``: a training job's view of an iteration, iterable over batches."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.flight as flight

from ..protocol import iterations, wire
from ..protocol.errors import InvalidArgument, ServerError
from ..protocol.iterations import IterationProgress
from . import api
from .acks import Acknowledger, acknowledging
from .connection import LavenderClient
from .formats import check_format, split

if TYPE_CHECKING:
    from .torch_loader import LavenderDataLoader

__all__ = ["Iteration", "PluginArg", "stream_batches", "stream_messages"]

PluginArg = str | tuple[str, dict[str, Any]] | dict[str, Any]
"""A plugin by name, or ``(name, params)``."""

_epochs: dict[str, int] = {}


def _plugin(value: PluginArg) -> iterations.PluginCall:
    if isinstance(value, str):
        return iterations.PluginCall(name=value)
    if isinstance(value, tuple):
        name, params = value
        return iterations.PluginCall(name=name, params=params)
    return iterations.PluginCall.model_validate(value)


def _torch_distributed() -> Any | None:
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
    dist = _torch_distributed()
    if dist is not None:
        found_rank, found_size = int(dist.get_rank()), int(dist.get_world_size())
    else:
        found_rank = int(os.environ.get("RANK", 0))
        found_size = int(os.environ.get("WORLD_SIZE", 1))
    return (found_rank if rank is None else rank), (
        found_size if world_size is None else world_size
    )


def _shared_iteration_id(spec: iterations.IterationSpec, rank: int) -> str:
    """The id every rank of a job computes alike, when the job did not name its iteration.

    Under ``torch.distributed``, rank 0 picks a fresh id and broadcasts it. Under torchrun
    (``TORCHELASTIC_RUN_ID``), the id is the run id, the spec and how many iterations of
    that spec this process opened before: ranks call ``from_dataset`` in the same order, and
    a rank restarted by torchrun rejoins (resumes) the iteration it was in.
    """
    digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]
    dist = _torch_distributed()
    if dist is not None:
        chosen = [f"it-{os.urandom(6).hex()}" if rank == 0 else ""]
        dist.broadcast_object_list(chosen, src=0)
        return str(chosen[0])
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id:
        epoch = _epochs.get(digest, 0)
        _epochs[digest] = epoch + 1
        return f"{run_id}-{digest}-{epoch}"[:128]
    raise InvalidArgument(
        f"world_size={spec.world_size} needs iteration_id=... (a name the job chooses, the same "
        "on every rank, e.g. 'run7-epoch3') so its ranks join one iteration; under torchrun "
        "or torch.distributed it is chosen for you"
    )


def stream_messages(
    client: LavenderClient, iteration_id: str, rank: int, worker: int = 0, num_workers: int = 1
) -> Iterator[tuple[pa.RecordBatch, list[tuple[int, list[list[int]]]]]]:
    """Messages of one rank's stream (or a worker's share), with their batches.

    Each message comes with its batches' row counts and ``seq`` ranges (``BatchMetadata``).
    """
    ticket = iterations.IterationTicket(
        iteration_id=iteration_id, rank=rank, worker=worker, num_workers=num_workers
    )
    with client.errors():
        reader = client.flight.do_get(flight.Ticket(wire.encode(ticket)), client.options(None))
    try:
        while True:
            with client.errors():
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    return
            if chunk.app_metadata is None:
                raise ServerError("a batch came without its metadata")
            metadata = json.loads(chunk.app_metadata.to_pybytes())
            yield chunk.data, metadata["batches"]
    finally:
        reader.cancel()


def stream_batches(
    client: LavenderClient,
    iteration_id: str,
    rank: int,
    worker: int = 0,
    num_workers: int = 1,
    format: str = "arrow",
) -> Iterator[tuple[Any, list[list[int]]]]:
    """Batches of one rank's stream (or a worker's share) in ``format``, with their ``seq``.

    A Flight message may carry several batches; they are cut apart here (as views).
    """
    for message, batches in stream_messages(client, iteration_id, rank, worker, num_workers):
        sizes = [rows for rows, _ in batches]
        for batch, (_, seq) in zip(split(message, sizes, format), batches, strict=True):
            yield batch, seq


class Iteration:
    """Batches of one rank of an iteration; create with ``from_dataset`` or ``resume``.

    Iterating yields batches in ``format``; a batch counts as completed when the next one is
    asked for (or the iterator is closed), and completions reach the server in bulk from a
    background thread. A new ``for`` loop over the same object (or ``Iteration.resume`` in a
    new process) continues with what is not completed yet.
    """

    def __init__(
        self,
        client: LavenderClient,
        iteration_id: str,
        rank: int,
        schema: pa.Schema,
        spec: dict[str, Any],
        format: str = "python",
        progress: bool = False,
    ) -> None:
        self.client = client
        self.id = iteration_id
        self.rank = rank
        self.schema = schema
        self.spec = spec
        self.format = check_format(format)
        self.progress = progress

    @classmethod
    def _open(
        cls,
        command: iterations.IterationCommand,
        rank: int,
        format: str,
        progress: bool,
        client: LavenderClient | None = None,
    ) -> Iteration:
        client = client or api.get_client()
        descriptor = flight.FlightDescriptor.for_command(wire.encode(command))
        with client.errors():
            info = client.flight.get_flight_info(descriptor, client.options())
        meta = json.loads(info.app_metadata)
        spec = meta["spec"]
        if not 0 <= rank < spec["world_size"]:
            raise InvalidArgument(
                f"rank {rank} is outside iteration {meta['iteration_id']}'s world of "
                f"{spec['world_size']}"
            )
        return cls(client, meta["iteration_id"], rank, info.schema, spec, format, progress)

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
        rank: int | None = None,
        world_size: int | None = None,
        replication_pg: Sequence[Sequence[int]] | None = None,
        filters: Sequence[PluginArg] | None = None,
        collater: PluginArg | None = None,
        preprocessors: Sequence[PluginArg] | None = None,
        max_retry_count: int = 0,
        skip_on_failure: bool = False,
        join: str = "left",
        iteration_id: str | None = None,
        format: str = "python",
        progress: bool = False,
        client: LavenderClient | None = None,
    ) -> Iteration:
        """Create an iteration over a dataset, or join the one ``iteration_id`` names.

        Ranks of one job pass the same arguments (and ``iteration_id``, unless
        ``torch.distributed``/torchrun can choose it): the first creates the iteration, the
        others join it. Without an id and with one rank, every call makes a new iteration.
        ``drop_last=True`` gives every rank the same number of full batches (DDP-safe).

        ``shardsets`` and ``columns`` choose what is read (the main shardset always is; a
        shardset none of whose columns is wanted is never opened). ``join="left"`` keeps
        every sample of the main shardset (columns a feature shardset lacks are null);
        ``join="inner"`` keeps those present in every selected shardset, and counts the
        others as filtered. ``client``: the connection to use (default: the default client).
        """
        rank, world_size = default_world(rank, world_size)
        spec = wire.build(
            iterations.IterationSpec,
            "iteration",
            dataset_id=dataset_id,
            shardsets=list(shardsets) if shardsets is not None else None,
            columns=list(columns) if columns is not None else None,
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=shuffle_seed,
            shuffle_block_size=shuffle_block_size,
            drop_last=drop_last,
            world_size=world_size,
            replication_pg=[list(g) for g in replication_pg] if replication_pg else None,
            filters=[_plugin(f) for f in filters or ()],
            collater=_plugin(collater) if collater is not None else None,
            preprocessors=[_plugin(p) for p in preprocessors or ()],
            max_retry_count=max_retry_count,
            skip_on_failure=skip_on_failure,
            join=join,
        )
        if iteration_id is None and world_size > 1:
            iteration_id = _shared_iteration_id(spec, rank)
        command = wire.build(
            iterations.IterationCommand, "iteration", iteration_id=iteration_id, spec=spec
        )
        return cls._open(command, rank, format, progress, client)

    @classmethod
    def resume(
        cls,
        iteration_id: str,
        rank: int | None = None,
        format: str = "python",
        progress: bool = False,
        client: LavenderClient | None = None,
    ) -> Iteration:
        """Continue an iteration (after a crash, a restart, or in another process)."""
        rank, _ = default_world(rank, None)
        command = wire.build(iterations.IterationCommand, "iteration", iteration_id=iteration_id)
        return cls._open(command, rank, format, progress, client)

    def get_progress(self) -> IterationProgress:
        """Where the iteration stands, every rank included."""
        return self.client.get_iteration(self.id)

    def rank_total(self) -> int:
        """Samples this rank delivers in the epoch."""
        return self.get_progress().ranks[self.rank].total

    def __len__(self) -> int:
        """Batches this rank delivers in a full epoch."""
        return -(-self.rank_total() // int(self.spec["batch_size"]))

    def __iter__(self) -> Iterator[Any]:
        items = stream_batches(self.client, self.id, self.rank, format=self.format)
        acks = Acknowledger(self.client, self.id, self.rank)
        if not self.progress:
            yield from acknowledging(items, acks)
            return
        from tqdm.auto import tqdm

        state = self.get_progress().ranks[self.rank]
        with tqdm(total=state.total, initial=state.completed, unit="samples", desc=self.id) as bar:

            def counted() -> Iterator[tuple[Any, list[list[int]]]]:
                for batch, seq in items:
                    bar.update(sum(b - a for a, b in seq))
                    yield batch, seq

            yield from acknowledging(counted(), acks)

    def to_torch_dataloader(
        self,
        prefetch_factor: int | None = None,
        pin_memory: bool = False,
        pin_memory_device: str = "",
        num_workers: int = 0,
        multiprocessing_context: str | None = None,
        timeout: float = 0,
    ) -> LavenderDataLoader:
        """A torch ``DataLoader`` over this rank's batches (``python`` format becomes ``torch``).

        Each worker opens its own Flight connection and streams its share of the rank's
        batches (never a copy); workers start with ``spawn`` by default, since gRPC does not
        survive ``fork``. Batches are acknowledged by the loop that consumes them.
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
        )
