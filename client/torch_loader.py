"""``LavenderDataLoader``: a torch ``DataLoader`` over an iteration, epoch after epoch.

Each worker process streams its share of the rank's batches over its own connection; the
loop in the main process reports what it takes and completes. Iterating the loader again
is the next epoch: the main process decides which (``Iteration.next_epoch``) and tells its
workers through a shared value, so a rank and its workers always agree. Workers stay for
the next epochs by default (the ``spawn`` start-up is paid once per job).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol.iterations import IterationTicket
from .acks import acknowledging, acknowledging_samples
from .connection import LavenderClient
from .formats import samples, torch_missing
from .iteration import stream_batches
from .settings import ClientSettings

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


def passthrough(item: Any) -> Any:
    """The collate function: batches come made; torch's default would walk every string."""
    return item


class IterationDataset(torch.utils.data.IterableDataset):
    """One rank's stream; in a worker process, that worker's share of it.

    It carries the whole :class:`ClientSettings` (URLs, key, timeout, TLS), pickled into
    each worker, so a worker connects exactly as the loop's process does, and the servers
    of the rank (``locations``, the order its streams try them in). ``epoch`` is shared
    with the workers (set by the main process before each epoch).
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

    def __getstate__(self) -> dict[str, Any]:
        # the shared epoch travels to spawned workers (as multiprocessing allows it: while
        # spawning); any other copy takes the epoch it is at
        state = dict(self.__dict__)
        if multiprocessing.context.get_spawning_popen() is None:
            state["epoch"] = int(self.epoch.value) if hasattr(self.epoch, "value") else self.epoch
        return state

    def __iter__(self) -> Iterator[tuple[Any, Consumed]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        assert self.ticket is not None, "the loader sets the ticket before the first epoch"
        epoch = int(self.epoch.value) if hasattr(self.epoch, "value") else int(self.epoch)
        ticket = self.ticket.model_copy(
            update={"epoch": epoch, "worker": worker, "num_workers": num_workers}
        )
        # a connection of this process: gRPC channels do not survive fork
        with LavenderClient(self.settings) as client:
            for batch, seq in stream_batches(client, ticket, self.format, locations=self.locations):
                yield batch, Consumed(seq)


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

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        epoch = self.iteration.next_epoch()
        self._epoch.value = epoch
        dataset = self.dataset
        assert isinstance(dataset, IterationDataset)
        if dataset.ticket is None:  # before the workers start: they get it with the dataset
            dataset.ticket = self.iteration.ticket(epoch)
            dataset.locations = self.iteration.locations
        acks = self.iteration.acknowledger(epoch)
        items = ((batch, token.seq) for batch, token in super().__iter__())
        if self.iteration.spec.batch_size == 0:  # single samples, cut from whole groups
            yield from acknowledging_samples(items, acks, samples)
            return
        yield from acknowledging(items, acks)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass iterate epoch ``epoch`` (as torch's ``DistributedSampler``)."""
        self.iteration.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.iteration)
