"""``LavenderDataLoader``: a torch ``DataLoader`` over an iteration, acknowledging as it goes.

Importing this module imports torch: without it, the import fails with one line saying what
to install (``Iteration.to_torch_dataloader`` imports it on first use).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .acks import Acknowledger, acknowledging
from .connection import LavenderClient
from .formats import torch_missing
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

    seq: list[list[int]]


def passthrough(item: Any) -> Any:
    """The collate function: batches come made; torch's default would walk every string."""
    return item


class IterationDataset(torch.utils.data.IterableDataset):
    """One rank's stream; in a worker process, that worker's share of it.

    It carries the whole :class:`ClientSettings` (URLs, key, timeout, TLS), pickled into
    each worker, so a worker connects exactly as the loop's process does.
    """

    def __init__(self, settings: ClientSettings, iteration_id: str, rank: int, format: str) -> None:
        self.settings = settings
        self.iteration_id = iteration_id
        self.rank = rank
        self.format = format

    def __iter__(self) -> Iterator[tuple[Any, Consumed]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A connection of this process: gRPC channels do not survive fork.
        with LavenderClient(self.settings) as client:
            for batch, seq in stream_batches(
                client, self.iteration_id, self.rank, worker, num_workers, self.format
            ):
                yield batch, Consumed(seq)


class LavenderDataLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` over an iteration's rank; iterate it like any other."""

    def __init__(
        self,
        iteration: Iteration,
        prefetch_factor: int | None = None,
        pin_memory: bool = False,
        pin_memory_device: str = "",
        num_workers: int = 0,
        multiprocessing_context: str | None = None,
        timeout: float = 0,
    ) -> None:
        self.iteration = iteration
        fmt = iteration.format if iteration.format != "python" else "torch"
        dataset = IterationDataset(iteration.client.settings, iteration.id, iteration.rank, fmt)
        if num_workers > 0 and multiprocessing_context is None:
            multiprocessing_context = "spawn"
        super().__init__(
            dataset,
            batch_size=None,
            collate_fn=passthrough,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            pin_memory=pin_memory,
            pin_memory_device=pin_memory_device,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
            persistent_workers=False,
            timeout=timeout,
        )

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        acks = Acknowledger(self.iteration.client, self.iteration.id, self.iteration.rank)
        items = ((batch, token.seq) for batch, token in super().__iter__())
        yield from acknowledging(items, acks)

    def __len__(self) -> int:
        return len(self.iteration)
