"""Changing a running iteration: its mixture weights, its world size.

Both changes run in one catalog transaction that holds the iteration alone and every state
row of the epoch (``ProgressStore.change_epoch``), so no claim races them:

- **weights** take effect at the first global seq after everything any rank has been
  handed (rounded up to a chunk; to a round of chunks with ``drop_last``), or at ``at``
  when that is later. The rank sizes follow the new epoch length in the same transaction.
  When every rank has been handed all of its epoch, the change starts the next epoch.
- **world size**: what the old world did not finish is dealt anew (``deals.deal_anew``);
  every rank row of the epoch is replaced by the new world's. The first rank of the new
  world to ask makes the change, the others find it made. A different world size is
  refused while the last change is fresh (nothing of the new world finished yet and it is
  less than ``FRESH_SECONDS`` old) or while streams of the current world are open.

A transaction that finds the iteration at another version than the caller's view (a
change made through another server meanwhile) fails with ``VersionChanged`` before it
changes anything; the caller reloads and tries again.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...catalog import EpochRows, VersionChanged
from ...protocol.errors import InvalidArgument, IterationBusy, IterationConflict
from ...protocol.iterations import WeightsSet
from .changes import DEAL, WEIGHTS
from .deals import deal_anew
from .draws import check_weights
from .mixture import MixturePlan
from .state import RankState

if TYPE_CHECKING:
    from .live import LiveIteration

__all__ = ["FRESH_SECONDS", "resize", "set_weights"]

FRESH_SECONDS = 60.0
ATTEMPTS = 20
STREAMS_END_SECONDS = 3.0
"""How long a resize waits for the old world's streams to end (a killed job's connections
take a moment to be noticed: a stream looks at its connection every quarter second)."""


class _Later(Exception):
    """A rank started a later epoch meanwhile: look at the epochs again."""


def _states(rows: EpochRows) -> dict[int, RankState]:
    return {r: RankState.from_json(row.state) for r, row in rows.rows.items() if row.state}


def _latest_epoch(live: LiveIteration) -> int:
    latest = live.store.latest(live.id)
    world = live.views.world_now
    return max((e for r, (e, _) in latest.items() if r < world), default=0)


# -- weights -----------------------------------------------------------------------------


def set_weights(live: LiveIteration, weights: dict[str, float], at: int | None) -> WeightsSet:
    """Change a mixture's weights for every rank (see the module docstring)."""
    mixture = live.setup.mixture
    if mixture is None:
        raise InvalidArgument(
            f"iteration {live.id} is not a mixture: set_mixture_weights changes the weights "
            "of iterations made with Iteration.from_mixture"
        )
    unknown = sorted(set(weights) - set(mixture.ids))
    if unknown:
        raise InvalidArgument(
            f"dataset {unknown[0]!r} is not a source of mixture {live.id}; its sources: "
            f"{', '.join(mixture.ids)}"
        )
    for _ in range(ATTEMPTS):
        live.refresh()
        epoch = _latest_epoch(live)
        version = live.views.version

        def change(rows: EpochRows, epoch: int = epoch, version: int = version) -> WeightsSet:
            if rows.version != version:
                raise VersionChanged(live.id, rows.version)
            if rows.later:
                raise _Later
            return _change_weights(live, rows, epoch, weights, at)

        try:
            answer = live.store.change_epoch(live.id, epoch, change)
        except (VersionChanged, _Later):
            continue
        live.refresh()
        return answer
    raise IterationBusy(f"iteration {live.id} kept changing: set its weights again")


def _change_weights(
    live: LiveIteration,
    rows: EpochRows,
    epoch: int,
    asked: dict[str, float],
    at: int | None,
) -> WeightsSet:
    mixture = live.setup.mixture
    assert mixture is not None
    spec = live.setup.spec
    plan = live.views.plan(epoch)
    assert isinstance(plan, MixturePlan)
    order = plan.order
    vector = [float(w) for w in order.weights[-1]]
    for dataset_id, weight in asked.items():
        vector[mixture.ids.index(dataset_id)] = float(weight)
    vector = list(check_weights(vector, len(vector)))
    named = dict(zip(mixture.ids, vector, strict=True))
    states = _states(rows)
    world = live.views.world_size(epoch)
    handed_out = bool(states) and all(
        r in states and len(states[r].covered) >= states[r].size for r in range(world)
    )
    if handed_out:  # nothing of this epoch is left to draw: the next one starts with them
        rows.add(WEIGHTS, json.dumps({"from_seq": 0, "weights": vector}), epoch=epoch + 1)
        following = mixture.order(epoch + 1, [(0, vector)])
        total = following.total
        return WeightsSet(epoch=epoch + 1, from_seq=0, weights=named, total=total)
    step = spec.batch_size * (plan.partitions if spec.drop_last else 1)
    frontier = live.views.frontier(epoch, states)
    from_seq = -(-frontier // step) * step
    if at is not None:
        from_seq = max(from_seq, at)
    while True:  # with drop_last a shorter epoch must still hold what was handed out
        scratch = copy.copy(plan)
        scratch.retarget(order.changed(from_seq, vector, rows.version + 1))
        sizes = {r: scratch.partition_size(live.views.partition(epoch, r)) for r in range(world)}
        if all(not s.covered or s.covered.ranges()[-1][1] <= sizes[r] for r, s in states.items()):
            break
        from_seq += step
    for rank, state in states.items():
        state.size = sizes[rank]
        rows.rows[rank].set(state.to_json(), state.expires_at, state.nodes)
    rows.add(WEIGHTS, json.dumps({"from_seq": from_seq, "weights": vector}))
    return WeightsSet(epoch=epoch, from_seq=from_seq, weights=named, total=scratch.total)


# -- world size --------------------------------------------------------------------------


def resize(live: LiveIteration, world_size: int, dead_nodes: Sequence[str] = ()) -> bool:
    """Deal what the iteration did not finish to ``world_size`` ranks; whether it changed.

    Raises:
        InvalidArgument: the iteration has replication groups, or its ranks are in
            different epochs with work left in the earlier one.
        IterationConflict: another world size was asked for just before (ranks of one
            new world pass the same ``world_size``).
        IterationBusy: streams of the current world are open.
    """
    spec = live.setup.spec
    if spec.replication_pg:
        raise InvalidArgument(
            f"iteration {live.id} has replication groups (replication_pg): it resumes with "
            f"its world of {spec.world_size} ranks only"
        )
    waited_until = time.monotonic() + STREAMS_END_SECONDS
    for _ in range(ATTEMPTS):
        live.refresh()
        views = live.views
        if views.world_now == world_size:
            return False
        latest = live.store.latest(live.id)
        world = views.world_now
        epoch = _latest_epoch(live)
        for rank in range(world):
            found = latest.get(rank)
            if found is not None and found[0] < epoch and not found[1].done:
                raise InvalidArgument(
                    f"rank {rank} of iteration {live.id} is still in epoch {found[0]} while "
                    f"others are in epoch {epoch}: resume it with the old world size "
                    f"({world}) to finish that epoch, then resize"
                )
        version = views.version

        def change(rows: EpochRows, epoch: int = epoch, version: int = version) -> bool:
            if rows.version != version:
                raise VersionChanged(live.id, rows.version)
            if rows.later:
                raise _Later
            return _deal(live, rows, epoch, world_size, frozenset(dead_nodes), time.time())

        try:
            changed = live.store.change_epoch(live.id, epoch, change)
        except (VersionChanged, _Later):
            continue
        except IterationBusy:
            if time.monotonic() > waited_until:
                raise
            time.sleep(0.2)
            continue
        live.refresh()
        return changed
    raise IterationBusy(f"iteration {live.id} kept changing: resume it again")


def _deal(
    live: LiveIteration,
    rows: EpochRows,
    epoch: int,
    world_size: int,
    dead_nodes: frozenset[str],
    now: float,
) -> bool:
    views, spec = live.views, live.setup.spec
    current = views.world_size(epoch)
    if current == world_size:
        return False
    states = _states(rows)
    for state in states.values():
        state.expire(now, dead_nodes)
    open_streams = sum(s.open_streams for s in states.values())
    if open_streams:
        raise IterationBusy(
            f"iteration {live.id} has {open_streams} open stream(s) of its {current}-rank "
            f"world: every rank of a new world passes the same world_size; to resize again, "
            "stop the job first (a dead server's streams end after its node timeout)"
        )
    entry = views.changes.deal(epoch)
    if (
        entry is not None
        and now - entry.at < FRESH_SECONDS
        and not any(s.finished for s in states.values())
    ):
        raise IterationConflict(
            f"iteration {live.id} was just resumed with world_size={current} by another "
            f"rank; this rank asks for world_size={world_size}: every rank of the new world "
            "passes the same world_size"
        )
    base = views.base_plan(epoch)
    for rank in range(current):
        if rank not in states:
            states[rank] = RankState(views.rank_size(epoch, rank), spec.batch_size)
    deal = deal_anew(
        states,
        entry.deal if entry is not None else None,
        base,
        views.partitions(epoch),
        world_size,
        spec.batch_size,
        spec.drop_last,
    )
    generation = max(s.next_generation for s in states.values())
    for rank in range(world_size):
        state = RankState(
            deal.partition_size(rank, base.available),
            spec.batch_size,
            deal=deal.number,
            next_generation=generation,
        )
        rows.row(rank).set(state.to_json(), None, ())
    for rank in [r for r in rows.rows if r >= world_size]:
        rows.drop(rank)
    rows.add(DEAL, json.dumps(deal.to_json()))
    return True
