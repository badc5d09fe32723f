"""``LavenderDataLoader``: a torch ``DataLoader`` over an iteration, epoch after epoch.

Each worker process streams its share of the rank's batches over its own connection; the
loop in the main process reports what it takes and completes. Iterating the loader again
is the next epoch: the main process decides which (``Iteration.next_epoch``) and tells its
workers through a shared value, so a rank and its workers always agree. Workers stay for
the next epochs by default (the ``spawn`` start-up is paid once per job). Batches reach the
main process through shared memory, not pickled (``shipping``).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol.iterations import BatchMetadata, IterationTicket
from .acks import acknowledging, acknowledging_samples
from .connection import LavenderClient
from .formats import samples, torch_missing
from .settings import ClientSettings
from .shipping import Shipper, Token, sweep_at_exit
from .streams import stream_batches

try:
    import torch.utils.data
except ModuleNotFoundError as exc:
    if exc.name != "torch":
        raise
    raise torch_missing("to_torch_dataloader()") from None

if TYPE_CHECKING:
    from .iteration import Iteration

__all__ = ["IterationDataset", "LavenderDataLoader"]


@dataclass
class Consumed:
    """The sequence ranges of one batch, carried beside it from a worker to the loop."""

    seq: list[tuple[int, int]]
    report_every: int | None = None
    deal: int | None = None


def passthrough(item: Any) -> Any:
    """The collate function: batches come made; torch's default would walk every string."""
    return item


class IterationDataset(torch.utils.data.IterableDataset):
    """One rank's stream; in a worker process, that worker's share of it.

    It carries the whole :class:`ClientSettings` (URLs, key, timeout, TLS), pickled into
    each worker, so a worker connects exactly as the loop's process does, and the servers
    of the rank (``locations``, the order its streams try them in). ``epoch`` is shared
    with the workers (set by the main process before each epoch). ``ship``: the batches go
    to a loader's :class:`~.shipping.Shipper` (Arrow, with a ``Token``).
    """

    def __init__(
        self,
        settings: ClientSettings,
        ticket: IterationTicket | None,
        format: str,
        epoch: Any,
        locations: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.ticket = ticket
        self.format = format
        self.epoch = epoch
        self.locations = list(locations)
        self.ship = False

    def __getstate__(self) -> dict[str, Any]:
        # the shared epoch travels to spawned workers (as multiprocessing allows it: while
        # spawning); any other copy takes the epoch it is at
        state = dict(self.__dict__)
        if multiprocessing.context.get_spawning_popen() is None:
            state["epoch"] = int(self.epoch.value) if hasattr(self.epoch, "value") else self.epoch
        return state

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        assert self.ticket is not None, "the loader sets the ticket before the first epoch"
        epoch = int(self.epoch.value) if hasattr(self.epoch, "value") else int(self.epoch)
        ticket = self.ticket.model_copy(
            update={"epoch": epoch, "worker": worker, "num_workers": num_workers}
        )
        report: list[int | None] = [None]
        deal: list[int | None] = [None]

        def learn(metadata: BatchMetadata) -> None:
            report[0] = metadata.report_every  # the loop's process reports as the server asks
            deal[0] = metadata.deal  # and of the deal the batches are of (elastic resume)

        ship = self.ship and info is not None
        # a connection of this process: gRPC channels do not survive fork
        with LavenderClient(self.settings) as client:
            batches = stream_batches(
                client,
                ticket,
                "arrow" if ship else self.format,
                on_metadata=learn,
                locations=self.locations,
            )
            for batch, seq in batches:
                made = Token if ship else Consumed
                yield batch, made(seq, report[0], deal[0])


class LavenderDataLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` over an iteration's rank; iterate it like any other, once an epoch."""

    def __init__(
        self,
        iteration: Iteration,
        prefetch_factor: int | None = None,
        pin_memory: bool = False,
        pin_memory_device: str = "",
        num_workers: int = 0,
        multiprocessing_context: str | None = None,
        timeout: float = 0,
        persistent_workers: bool | None = None,
    ) -> None:
        self.iteration = iteration
        fmt = iteration.format if iteration.format != "python" else "torch"
        if num_workers > 0 and multiprocessing_context is None:
            multiprocessing_context = "spawn"
        context = multiprocessing.get_context(multiprocessing_context or "spawn")
        self._epoch = context.Value("q", 0)
        # the ticket is set at the first epoch: a script's top level, which spawned
        # workers run again, builds the loader but must create nothing on the server
        dataset = IterationDataset(iteration.client.settings, None, fmt, self._epoch)
        dataset.ship = num_workers > 0
        if dataset.ship:
            sweep_at_exit()
        self._format = fmt
        super().__init__(
            dataset,
            batch_size=None,
            collate_fn=passthrough,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            pin_memory=pin_memory,
            pin_memory_device=pin_memory_device,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
            persistent_workers=(num_workers > 0)
            if persistent_workers is None
            else persistent_workers,
            timeout=timeout,
        )

    def __setattr__(self, name: str, value: Any) -> None:
        # with workers, the collate runs there and its result comes back by shared memory
        if name == "collate_fn" and getattr(self, "num_workers", 0) > 0:
            user = None if value is passthrough or isinstance(value, Shipper) else value
            if isinstance(value, Shipper):
                user = value.collate
            value = Shipper(user, self._format, Consumed)
        super().__setattr__(name, value)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        epoch = self.iteration.next_epoch()
        self._epoch.value = epoch
        dataset = self.dataset
        assert isinstance(dataset, IterationDataset)
        if dataset.ticket is None:  # before the workers start: they get it with the dataset
            dataset.ticket = self.iteration.ticket(epoch)
            dataset.locations = self.iteration.locations
        acks = self.iteration.acknowledger(epoch)
        shipper = self.collate_fn if isinstance(self.collate_fn, Shipper) else None

        def items() -> Iterator[tuple[Any, list[tuple[int, int]]]]:
            for item in super(LavenderDataLoader, self).__iter__():
                batch, token = shipper.unpack(item) if shipper is not None else item
                if token.report_every:
                    acks.report_every = token.report_every
                acks.deal = token.deal
                if self.pin_memory and shipper is not None:
                    batch = torch.utils.data._utils.pin_memory.pin_memory(batch)
                yield batch, token.seq

        if self.iteration.spec.batch_size == 0:  # single samples, cut from whole groups
            yield from acknowledging_samples(items(), acks, samples)
            return
        yield from acknowledging(items(), acks)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass iterate epoch ``epoch`` (as torch's ``DistributedSampler``)."""
        self.iteration.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.iteration)
