"""``LavenderDataLoader``: a torch ``DataLoader`` over an iteration, acknowledging as it goes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.utils.data

from .acks import Acknowledger, acknowledging
from .connection import LavenderClient
from .iteration import stream_batches

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
    """One rank's stream; in a worker process, that worker's share of it."""

    def __init__(
        self,
        api_url: str,
        api_key: str | None,
        timeout: float,
        iteration_id: str,
        rank: int,
        format: str,
    ) -> None:
        self.api_url = api_url
        self.api_key = api_key
        self.timeout = timeout
        self.iteration_id = iteration_id
        self.rank = rank
        self.format = format

    def __iter__(self) -> Iterator[tuple[Any, Consumed]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A connection of this process: gRPC channels do not survive fork.
        with LavenderClient(self.api_url, self.api_key, self.timeout) as client:
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
        client = iteration.client
        dataset = IterationDataset(
            client.api_url, client.api_key, client.timeout, iteration.id, iteration.rank, fmt
        )
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
