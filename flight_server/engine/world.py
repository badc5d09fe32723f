"""``World``: rank, world size, replication groups and DataLoader workers in one value object.

Every piece of distributed arithmetic lives here: which partition of an epoch a rank reads,
and which of that partition's chunks a worker process streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...protocol.errors import InvalidArgument

__all__ = ["World", "replication_partitions"]


def replication_partitions(
    world_size: int, replication_pg: Sequence[Sequence[int]] | None
) -> list[int]:
    """For each rank, the partition it reads; ranks of one replication group share one.

    Groups must cover ``0 .. world_size - 1`` exactly once (a clear error otherwise);
    without groups every rank reads its own partition.
    """
    if world_size < 1:
        raise InvalidArgument(f"world_size must be >= 1, got {world_size}")
    if not replication_pg:
        return list(range(world_size))
    seen = sorted(r for group in replication_pg for r in group)
    if seen != list(range(world_size)) or any(len(g) == 0 for g in replication_pg):
        raise InvalidArgument(
            f"replication_pg {[list(g) for g in replication_pg]} must name every rank "
            f"0..{world_size - 1} exactly once"
        )
    partition = [0] * world_size
    for index, group in enumerate(replication_pg):
        for rank in group:
            partition[rank] = index
    return partition


@dataclass(frozen=True)
class World:
    """Where one stream sits: its rank among ``world_size`` and its worker among ``num_workers``.

    The epoch is cut into chunks of ``batch_size`` samples; chunk ``j`` belongs to partition
    ``j % num_partitions``. Within a partition, local chunks are dealt to the workers in runs
    of ``worker_chunks``: chunk ``c`` belongs to worker ``(c // worker_chunks) % num_workers``,
    so a rank's workers split its stream and never repeat it.
    """

    rank: int = 0
    world_size: int = 1
    replication_pg: tuple[tuple[int, ...], ...] | None = None
    worker: int = 0
    num_workers: int = 1
    worker_chunks: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise InvalidArgument(f"rank must be within 0..{self.world_size - 1}, got {self.rank}")
        if not 0 <= self.worker < self.num_workers:
            raise InvalidArgument(
                f"worker must be within 0..{self.num_workers - 1}, got {self.worker}"
            )
        if self.worker_chunks < 1:
            raise InvalidArgument(f"worker_chunks must be >= 1, got {self.worker_chunks}")
        replication_partitions(self.world_size, self.replication_pg)

    @property
    def partition(self) -> int:
        """The partition of the epoch this rank reads."""
        return replication_partitions(self.world_size, self.replication_pg)[self.rank]

    @property
    def num_partitions(self) -> int:
        """How many distinct partitions the epoch is split into."""
        return len(self.replication_pg) if self.replication_pg else self.world_size

    def owns(self, local_chunk: int) -> bool:
        """Whether this worker streams the partition's chunk ``local_chunk``."""
        return (local_chunk // self.worker_chunks) % self.num_workers == self.worker

    def next_owned(self, local_chunk: int) -> int:
        """The first chunk at or after ``local_chunk`` that this worker streams."""
        run = local_chunk // self.worker_chunks
        offset = (self.worker - run) % self.num_workers
        return local_chunk if not offset else (run + offset) * self.worker_chunks

    def run_left(self, local_chunk: int) -> int:
        """Chunks from ``local_chunk`` to the end of its run (one worker's, consecutive)."""
        if self.num_workers == 1:
            return 1 << 62
        return self.worker_chunks - local_chunk % self.worker_chunks
