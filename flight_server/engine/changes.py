"""``Changes`` and ``EpochViews``: a running iteration's changes, and its epochs with them.

Two kinds of change are stored with the iteration (``catalog.change_epoch``), each under the
iteration's next version:

- ``weights``: a mixture's weights from a seq of an epoch on. An epoch's *schedule* starts
  with the weights the epoch before ended with (the spec's for the first) and adds that
  epoch's changes, so a resume (client or server) draws exactly the same order;
- ``deal``: an epoch dealt anew to another world size (``deals``); the epochs after it are
  dealt to that world from the start.

``EpochViews`` is one server's view: the plan of each epoch (its deal, its mixture order
under its schedule) and the world of each rank. Plans are kept per epoch and deal; a
weight change retargets the kept mixture plans in place (seqs handed out before the change
map the same), a deal makes new ones (the old world's streams keep theirs until they
stop). Every state transaction checks the version this view is at, so a server that missed
a change reloads before it hands out or maps anything.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ...catalog import ChangeRecord
from ...protocol.errors import InvalidArgument
from .deals import Deal
from .draws import MixtureOrder
from .mixture import MixturePlan
from .plan import EpochPlan
from .plans import Plans
from .state import RankState
from .world import World

__all__ = ["DEAL", "WEIGHTS", "Changes", "DealEntry", "EpochViews", "WeightEntry"]

WEIGHTS = "weights"
DEAL = "deal"
EPOCHS_KEPT = 4


@dataclass(frozen=True)
class WeightEntry:
    """Weights in force from ``from_seq`` of ``epoch`` (and in the epochs after it)."""

    version: int
    epoch: int
    from_seq: int
    weights: tuple[float, ...]
    at: float


@dataclass(frozen=True)
class DealEntry:
    """An epoch dealt anew."""

    version: int
    epoch: int
    deal: Deal
    at: float


@dataclass(frozen=True)
class Changes:
    """Every change of an iteration up to ``version``, oldest first."""

    version: int = 0
    weights: tuple[WeightEntry, ...] = ()
    deals: tuple[DealEntry, ...] = ()

    @classmethod
    def from_records(cls, version: int, records: Sequence[ChangeRecord]) -> Changes:
        """Parse stored change records (kinds this server does not know are an error)."""
        weights: list[WeightEntry] = []
        deals: list[DealEntry] = []
        for record in records:
            body = json.loads(record.body)
            if record.kind == WEIGHTS:
                weights.append(
                    WeightEntry(
                        record.version,
                        record.epoch,
                        int(body["from_seq"]),
                        tuple(float(w) for w in body["weights"]),
                        record.created_at,
                    )
                )
            elif record.kind == DEAL:
                deals.append(
                    DealEntry(record.version, record.epoch, Deal.from_json(body),
                              record.created_at)
                )  # fmt: skip
            else:
                raise InvalidArgument(
                    f"the iteration has a change of kind {record.kind!r} this server does not "
                    "know: upgrade lavender-flight"
                )
        return cls(version, tuple(weights), tuple(deals))

    def schedule(
        self, epoch: int, initial: tuple[float, ...]
    ) -> list[tuple[int, tuple[float, ...]]]:
        """An epoch's ``(from_seq, weights)``: the weights it starts with, then its changes."""
        start = initial
        entries: list[tuple[int, tuple[float, ...]]] = []
        for change in self.weights:
            if change.epoch < epoch:
                start = change.weights
            elif change.epoch == epoch:  # a change replaces those planned after its seq
                entries = [e for e in entries if e[0] < change.from_seq]
                entries.append((change.from_seq, change.weights))
        if entries and entries[0][0] == 0:
            start = entries.pop(0)[1]
        return [(0, start), *entries]

    def weights_now(self, initial: tuple[float, ...]) -> tuple[float, ...]:
        """The weights of the last change (the spec's when none)."""
        return self.weights[-1].weights if self.weights else initial

    def deal(self, epoch: int) -> DealEntry | None:
        """An epoch's latest deal (None: the world it began with)."""
        found = None
        for entry in self.deals:
            if entry.epoch == epoch:
                found = entry
        return found

    def base_world(self, epoch: int) -> int | None:
        """The world an epoch begins with: the last resize's before it (None: the spec's)."""
        found = None
        for entry in self.deals:
            if entry.epoch < epoch:
                found = entry.deal.world_size
        return found

    def world_now(self, default: int) -> int:
        """The ranks the iteration has now."""
        return self.deals[-1].deal.world_size if self.deals else default


class EpochViews:
    """Plans and worlds of an iteration's epochs under its changes (see module doc)."""

    def __init__(self, setup: Plans, changes: Changes | None = None) -> None:
        self.setup = setup
        self.changes = changes or Changes()
        self._plans: dict[tuple[int, int], EpochPlan] = {}
        self._orders: dict[int, MixtureOrder] = {}
        self._lock = threading.RLock()

    @property
    def version(self) -> int:
        """The change version this view is at."""
        return self.changes.version

    # -- changes -------------------------------------------------------------------------

    def update(self, changes: Changes) -> None:
        """Apply newer changes: mixture plans kept are retargeted to their new schedules."""
        with self._lock:
            if changes.version < self.changes.version or changes == self.changes:
                return
            self.changes = changes
            for epoch in list(self._orders):
                order = self._order(epoch)
                for (number, _), plan in self._plans.items():
                    if number == epoch and isinstance(plan, MixturePlan):
                        plan.retarget(order)

    def _order(self, epoch: int) -> MixtureOrder:
        """A mixture epoch's order under its schedule now (reusing the scan before a change)."""
        mixture = self.setup.mixture
        assert mixture is not None
        schedule = self.changes.schedule(epoch, mixture.initial)
        found = self._orders.get(epoch)
        if found is not None and found.schedule != schedule:
            start, weights = schedule[-1]
            changed = found.changed(start, weights, self.version)  # keeps the scan before
            found = changed if changed.schedule == schedule else None
        if found is None:
            found = mixture.order(epoch, schedule, self.version)
        self._orders[epoch] = found
        while len(self._orders) > EPOCHS_KEPT:
            oldest = min(self._orders)
            del self._orders[oldest]
            for key in [k for k in self._plans if k[0] == oldest]:
                del self._plans[key]
        return found

    # -- plans and worlds ----------------------------------------------------------------

    def partitions(self, epoch: int) -> int:
        """How many partitions deal 0 of an epoch has."""
        world = self.changes.base_world(epoch)
        return world if world is not None else self.setup.num_partitions

    def base_plan(self, epoch: int) -> EpochPlan:
        """Deal 0 of an epoch (its order; the chunks over the world it began with)."""
        spec = self.setup.spec
        if spec.epochs is not None and epoch >= spec.epochs:
            self.setup.epoch(epoch)  # says the epoch is past the end
        partitions = self.partitions(epoch)
        if self.setup.mixture is None:
            return self.setup.epoch(epoch, partitions)
        with self._lock:
            key = (epoch, 0)  # deal 0 of a mixture: owned here, retargeted here
            plan = self._plans.get(key)
            if plan is None:
                order = self._order(epoch)
                plan = MixturePlan(
                    self.setup.mixture, order, spec.batch_size, partitions, spec.drop_last,
                    epoch,
                )  # fmt: skip
                self._plans[key] = plan
            return plan

    def plan(self, epoch: int) -> EpochPlan:
        """An epoch's plan under its current deal."""
        entry = self.changes.deal(epoch)
        base = self.base_plan(epoch)
        if entry is None:
            return base
        with self._lock:
            key = (epoch, entry.deal.number)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = base.dealt(entry.deal)
            return plan

    def deal_number(self, epoch: int) -> int:
        """The current deal of an epoch (0: the world it began with)."""
        entry = self.changes.deal(epoch)
        return entry.deal.number if entry is not None else 0

    def world_size(self, epoch: int) -> int:
        """The ranks of an epoch now."""
        entry = self.changes.deal(epoch)
        if entry is not None:
            return entry.deal.world_size
        world = self.changes.base_world(epoch)
        return world if world is not None else self.setup.spec.world_size

    @property
    def world_now(self) -> int:
        """The ranks the iteration has now."""
        return self.changes.world_now(self.setup.spec.world_size)

    def resized(self, epoch: int) -> bool:
        """Whether the epoch's world is not the spec's (replication groups no longer apply)."""
        return self.changes.deal(epoch) is not None or (self.changes.base_world(epoch) is not None)

    def world(
        self, epoch: int, rank: int, worker: int = 0, num_workers: int = 1, worker_chunks: int = 1
    ) -> World:
        """Where one stream of an epoch sits."""
        if not self.resized(epoch):
            return self.setup.world(rank, worker, num_workers, worker_chunks)
        size = self.world_size(epoch)
        if not 0 <= rank < size:
            raise InvalidArgument(f"rank {rank} is outside the iteration's world of {size}")
        return World(
            rank=rank,
            world_size=size,
            worker=worker,
            num_workers=num_workers,
            worker_chunks=worker_chunks,
        )

    def partition(self, epoch: int, rank: int) -> int:
        """The partition a rank reads in an epoch."""
        if not self.resized(epoch):
            return self.setup.partitions[rank]
        return rank

    def rank_size(self, epoch: int, rank: int) -> int:
        """Samples one rank delivers in an epoch (as its deal and weights say now)."""
        return self.plan(epoch).partition_size(self.partition(epoch, rank))

    def frontier(self, epoch: int, states: Mapping[int, RankState]) -> int:
        """One past the last global seq any rank of the epoch was handed (0: none)."""
        plan = self.plan(epoch)
        found = 0
        for rank, state in states.items():
            if state.covered:
                last = np.array([state.covered.ranges()[-1][1] - 1], dtype=np.int64)
                found = max(found, int(plan.to_global(self.partition(epoch, rank), last)[0]) + 1)
        return found
