"""``EpochPlan``: the fixed, seeded order of one epoch, computed block by block.

Terms used throughout the iteration engine:

- *position*: a sample's place in the dataset, counting main-shard rows in shard order;
- *global sequence number*: a sample's place in the epoch's order (after shuffling);
- *chunk*: ``batch_size`` consecutive global sequence numbers; chunk ``j`` goes to
  partition ``j % partitions`` (see ``World``);
- *local sequence number*: a sample's place in one partition's stream.

Shuffling permutes the shard order, then cuts it into blocks of ``block_size`` shards and
permutes the samples of each block. Only the permutation of a block being read is ever in
memory, so memory is bounded by the block, whatever the dataset size.

Every epoch has its own order: epoch ``e`` draws from seeds derived from the iteration's
seed and ``e`` (epoch 0 keeps the order iterations had before epochs existed).

How a block's permutation is drawn is the plan's *order version* (``IterationPlan``
freezes it when an iteration is created, so an iteration resumed by a newer server keeps
its order): version 1 is numpy's ``permutation`` of the block; version 2
(``ORDER_VERSION``, every iteration created since 2026-12-02) draws the block's first
``ORDER_HEAD`` places on their own, then shuffles the rest. Both are uniform; version 2
lets a first batch wait for a few thousand draws instead of the whole block's.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...protocol.errors import InvalidArgument

if TYPE_CHECKING:
    from .deals import Deal

__all__ = ["ORDER_HEAD", "ORDER_VERSION", "Block", "BlockOrder", "EpochPlan"]

ORDER_VERSION = 2
"""The order version of iterations created now (see the module's docstring)."""

ORDER_HEAD = 1 << 13
"""Order version 2: the first places of a block drawn before the rest (a first batch, and
the first piece a block read gathers, need no more)."""


@dataclass(frozen=True)
class Block:
    """Shards read together (and shuffled together), in the order the plan reads them."""

    number: int
    shard_slots: tuple[int, ...]
    start: int
    size: int


class BlockOrder:
    """The permutation of one shuffled block: its ``head`` at once, the ``full`` order on demand.

    Order version 2 draws the head as a uniform ordered sample without replacement of
    ``ORDER_HEAD`` of the block's ``size`` places, then the rest as a uniform permutation
    of the places left: together a uniform permutation. Version 1 (and any block no larger
    than the head) draws the whole permutation at once. One owner draws it (a block's gather;
    ``EpochPlan.permutation`` draws its own).
    """

    def __init__(self, seed: list[int], size: int, version: int = ORDER_VERSION) -> None:
        if version not in (1, 2):
            raise InvalidArgument(f"unknown order version {version} (this server knows 1, 2)")
        self.size = size
        self._rng = np.random.default_rng(seed)
        self._full: np.ndarray | None = None
        if version == 1 or size <= ORDER_HEAD:
            self._full = self._rng.permutation(size)
            self.head = self._full
        else:
            self.head = self._rng.choice(size, size=ORDER_HEAD, replace=False)

    def full(self) -> np.ndarray:
        """The whole permutation (its first places are ``head``); drawn on the first call."""
        if self._full is None:
            left = np.ones(self.size, dtype=bool)
            left[self.head] = False
            found = np.empty(self.size, dtype=np.int64)
            found[: len(self.head)] = self.head
            found[len(self.head) :] = np.flatnonzero(left)
            self._rng.shuffle(found[len(self.head) :])
            self._full = found
        return self._full

    def upto(self, stop: int) -> np.ndarray:
        """The first ``stop`` places: from the head alone when it holds them."""
        return self.head[:stop] if stop <= len(self.head) else self.full()[:stop]


class EpochPlan:
    """The order of one epoch over a snapshot of the main shards' row counts."""

    def __init__(
        self,
        shard_rows: Sequence[int],
        batch_size: int,
        partitions: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        block_size: int = 1,
        drop_last: bool = False,
        epoch: int = 0,
        order_version: int = ORDER_VERSION,
    ) -> None:
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        if block_size < 1:
            raise InvalidArgument(f"shuffle_block_size must be >= 1, got {block_size}")
        self.shard_rows = [int(n) for n in shard_rows]
        self.batch_size = batch_size
        self.partitions = partitions
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.order_version = order_version
        self.drop_last = drop_last
        self.shard_starts = np.concatenate(([0], np.cumsum(self.shard_rows, dtype=np.int64)))
        available = int(self.shard_starts[-1])
        self.available = available
        """Samples of the epoch before ``drop_last`` (what a later deal may hand out)."""
        self.deal: Deal | None = None
        """A later deal of the epoch (elastic resume): local seqs map through its base."""
        if drop_last:
            # Only full batches, and the same number for every partition: DDP ranks stay
            # in lockstep to the last step instead of one waiting for the others forever.
            per_round = batch_size * partitions
            self.total = available // per_round * per_round
        else:
            self.total = available
        order = list(range(len(self.shard_rows)))
        if shuffle:
            order = np.random.default_rng(self._seed(0)).permutation(len(order)).tolist()
        if not shuffle:
            block_size = 1
        self.blocks: list[Block] = []
        start = 0
        for number, first in enumerate(range(0, len(order), block_size)):
            slots = tuple(order[first : first + block_size])
            size = sum(self.shard_rows[s] for s in slots)
            self.blocks.append(Block(number, slots, start, size))
            start += size
        self._block_starts = np.array([b.start for b in self.blocks] + [start], dtype=np.int64)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def _seed(self, *parts: int) -> list[int]:
        """The seed of one random draw of this epoch's order."""
        return [self.seed, *parts] + ([self.epoch] if self.epoch else [])

    @property
    def num_chunks(self) -> int:
        """Chunks in the epoch (the last may be short unless ``drop_last``)."""
        return -(-self.total // self.batch_size)

    def dealt(self, deal: Deal | None) -> EpochPlan:
        """The same order, its local seqs dealt by ``deal`` (a copy; None: deal 0)."""
        found = copy.copy(self)
        found.deal = deal
        return found

    def partition_size(self, partition: int) -> int:
        """Samples in one partition's stream."""
        if self.deal is not None:
            return self.deal.partition_size(partition, self.available)
        chunks = len(range(partition, self.num_chunks, self.partitions))
        if chunks == 0:
            return 0
        last_chunk = partition + (chunks - 1) * self.partitions
        last_size = (
            min(self.total, (last_chunk + 1) * self.batch_size) - last_chunk * self.batch_size
        )
        return (chunks - 1) * self.batch_size + last_size

    def to_global(self, partition: int, local: np.ndarray) -> np.ndarray:
        """Global sequence numbers of a partition's local sequence numbers."""
        if self.deal is not None:
            return self.deal.to_global(partition, local)
        local = np.asarray(local, dtype=np.int64)
        if self.partitions == 1:  # one partition: its chunks are the epoch's, in order
            return local
        chunk, offset = np.divmod(local, self.batch_size)
        return (chunk * self.partitions + partition) * self.batch_size + offset

    def block_of(self, seq: np.ndarray) -> np.ndarray:
        """The block number of each global sequence number."""
        return np.searchsorted(self._block_starts, seq, side="right") - 1

    def segments(self, seq: np.ndarray) -> list[tuple[int, int, int]]:
        """``(block, start, stop)`` slices of ascending global sequence numbers, by block."""
        if len(seq) == 0:
            return []
        first, last = (int(b) for b in self.block_of(seq[[0, -1]]))
        cuts = np.searchsorted(seq, self._block_starts[first + 1 : last + 1])
        bounds = [0, *cuts.tolist(), len(seq)]
        return [
            (first + i, bounds[i], bounds[i + 1])
            for i in range(last - first + 1)
            if bounds[i + 1] > bounds[i]
        ]

    def draw_order(self, number: int) -> BlockOrder:
        """A shuffled block's order drawn afresh, not kept (block reads keep it with the block)."""
        return BlockOrder(self._seed(1, number), self.blocks[number].size, self.order_version)

    def draw_permutation(self, number: int) -> np.ndarray:
        """``permutation(number)`` drawn afresh, not kept."""
        block = self.blocks[number]
        if not self.shuffle:
            return np.arange(block.size, dtype=np.int64)
        return self.draw_order(number).full()

    def permutation(self, number: int) -> np.ndarray:
        """The order of a block's samples: indices into its shards' rows laid end to end."""
        block = self.blocks[number]
        if not self.shuffle:
            return np.arange(block.size, dtype=np.int64)
        perm = self._perms.get(number)
        if perm is None:
            perm = self.draw_permutation(number)
            self._perms[number] = perm
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return perm

    def rows_in_block(self, number: int, seq: np.ndarray) -> np.ndarray:
        """For global sequence numbers inside block ``number``: rows of the block's shards."""
        return self.permutation(number)[np.asarray(seq, dtype=np.int64) - self.blocks[number].start]

    def positions(self, seq: np.ndarray) -> np.ndarray:
        """Dataset positions of global sequence numbers (in their order, ascending or not)."""
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) > 1 and not bool((seq[1:] > seq[:-1]).all()):
            # rows of work claimed back out of order: found in order, given back in theirs
            order = np.argsort(seq, kind="stable")
            found = np.empty(len(seq), dtype=np.int64)
            found[order] = self.positions(seq[order])
            return found
        out = np.empty(len(seq), dtype=np.int64)
        for number, start, stop in self.segments(seq):
            mask = slice(start, stop)
            rows = self.rows_in_block(number, seq[mask])
            slots = self.blocks[number].shard_slots
            sizes = np.array([self.shard_rows[s] for s in slots], dtype=np.int64)
            bounds = np.concatenate(([0], np.cumsum(sizes)))
            which = np.searchsorted(bounds, rows, side="right") - 1
            starts = self.shard_starts[np.array(slots, dtype=np.int64)]
            out[mask] = starts[which] + rows - bounds[which]
        return out
