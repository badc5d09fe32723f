"""``Plans``: what an iteration's stored record fixes, epoch by epoch, without reading data.

The plan of each epoch, the partition each rank reads, how many samples a rank delivers,
where a stream sits; for a mixture its sources' sizes and orders (``Mixture``: the frozen
shards of each source are in the record's plan). The live iteration's setup is a ``Plans``
with readers and transforms on top; progress of an iteration that no stream reads on this
server needs only this (and its changes: ``changes.EpochViews``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from ...protocol.errors import InvalidArgument
from ...protocol.iterations import SAMPLE_GROUP, IterationPlan, IterationSpec
from .mixture import Mixture, MixturePlan
from .plan import EpochPlan
from .world import World, replication_partitions

__all__ = ["Plans"]

PLANS_KEPT = 4


@dataclass
class Plans:
    """The epoch plans, partitions and rank sizes an iteration's spec and plan fix.

    ``spec`` is the spec as the engine runs it: ``batch_size`` 0 (single samples) becomes
    ``SAMPLE_GROUP`` (they travel and are acknowledged in groups); ``asked`` is as stored.
    """

    spec: IterationSpec
    plan: IterationPlan
    asked: IterationSpec = field(init=False)
    """The spec as stored (``batch_size`` 0 kept)."""
    partitions: list[int] = field(init=False)
    """The partition of the epoch each rank reads (ranks of a replication group share one)."""
    mixture: Mixture | None = field(init=False)
    """A mixture's sources and draws (None: one dataset)."""
    _plans: OrderedDict[tuple[int, int], EpochPlan] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.asked = self.spec
        if self.spec.batch_size == 0:
            self.spec = self.spec.model_copy(update={"batch_size": SAMPLE_GROUP})
        self.partitions = replication_partitions(self.spec.world_size, self.spec.replication_pg)
        self.mixture = None
        if self.spec.mixture is not None:
            if self.plan.sources is None or len(self.plan.sources) != len(self.spec.mixture):
                raise InvalidArgument("the iteration's plan does not match its mixture")
            self.mixture = Mixture(
                self.spec, self.plan.sources, self.plan.seed, self.plan.order_version
            )

    @property
    def num_partitions(self) -> int:
        """How many distinct partitions each epoch is cut into."""
        return len(set(self.partitions))

    def epoch(self, number: int, partitions: int | None = None) -> EpochPlan:
        """The plan of one epoch (the last few are kept), over ``partitions`` if given.

        A mixture's is a ``MixturePlan`` with the spec's weights (``changes`` applies live
        weights to it).
        """
        if self.spec.epochs is not None and number >= self.spec.epochs:
            raise InvalidArgument(
                f"the iteration makes {self.spec.epochs} epoch(s) (epochs={self.spec.epochs}); "
                f"epoch {number} is past its end: create a new iteration for more passes"
            )
        parts = partitions if partitions is not None else self.num_partitions
        with self._lock:
            found = self._plans.get((number, parts))
            if found is None:
                if self.mixture is not None:
                    found = MixturePlan(
                        self.mixture,
                        self.mixture.order(number, [(0, self.mixture.initial)]),
                        self.spec.batch_size,
                        parts,
                        self.spec.drop_last,
                        number,
                    )
                else:
                    found = EpochPlan(
                        [rows for _, rows in self.plan.shards],
                        self.spec.batch_size,
                        partitions=parts,
                        shuffle=self.spec.shuffle,
                        seed=self.plan.seed,
                        block_size=self.spec.shuffle_block_size,
                        drop_last=self.spec.drop_last,
                        epoch=number,
                        order_version=self.plan.order_version,
                    )
                self._plans[(number, parts)] = found
                while len(self._plans) > PLANS_KEPT:
                    self._plans.popitem(last=False)
            else:
                self._plans.move_to_end((number, parts))
            return found

    @property
    def total(self) -> int:
        """Samples per epoch, every rank together (a mixture's: with the spec's weights)."""
        return self.epoch(0).total

    def rank_size(self, rank: int) -> int:
        """Samples one rank delivers in an epoch (the same in every epoch)."""
        return self.epoch(0).partition_size(self.partitions[rank])

    def world(
        self, rank: int, worker: int = 0, num_workers: int = 1, worker_chunks: int = 1
    ) -> World:
        """Where one stream sits."""
        if not 0 <= rank < self.spec.world_size:
            raise InvalidArgument(
                f"rank {rank} is outside the iteration's world of {self.spec.world_size}"
            )
        return World(
            rank=rank,
            world_size=self.spec.world_size,
            replication_pg=(
                tuple(tuple(g) for g in self.spec.replication_pg)
                if self.spec.replication_pg
                else None
            ),
            worker=worker,
            num_workers=num_workers,
            worker_chunks=worker_chunks,
        )
