"""Progress of an iteration, as its loops see it, from the rank rows of the catalog.

Works from the stored record and its changes alone (``EpochViews`` over ``Plans``), so
listing iterations never builds a reader; a server that serves some of the ranks adds what
only it knows (``RankFlow``: the samples its streams dropped inside batches the loop has not
completed, the read-ahead window). After an elastic resume the epoch's counts add what the
deals before finished (``Deal.carried``); a mixture's progress says how far each source got.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ...catalog._progress import RankRow
from ...protocol.iterations import (
    IterationProgress,
    IterationRecord,
    MixtureProgress,
    RankProgress,
    SourceProgress,
    WeightChange,
)
from .changes import EpochViews
from .deals import Carried, _merge, ranges_to_global
from .flow import RankFlow
from .mixture import MixturePlan
from .state import RankState

__all__ = ["MAX_LISTED_POSITIONS", "iteration_progress", "mixture_progress"]

MAX_LISTED_POSITIONS = 1000
"""Dataset positions listed in flight per rank (the first ones)."""


def _rank(
    views: EpochViews,
    rank: int,
    epoch: int,
    state: RankState,
    flow: RankFlow | None,
    positions: bool,
) -> tuple[RankProgress, list[int]]:
    filtered = failed = 0
    limit = None
    held = state.inflight
    if flow is not None:
        with flow.cond:
            # dropped inside batches the loop took but did not complete yet
            extra = flow.dropped_in(held.ranges())
            filtered, failed = len(extra[0]), len(extra[1])
            limit = flow.window() if flow.windowed else None
    listed: list[int] = []
    if positions and held:
        plan = views.plan(epoch)
        partition = views.partition(epoch, rank)
        for a, b in held:
            if len(listed) >= MAX_LISTED_POSITIONS:
                break
            local = np.arange(a, min(b, a + MAX_LISTED_POSITIONS - len(listed)))
            seq = plan.to_global(partition, local)
            listed.extend(plan.positions(np.sort(seq)).tolist())
    return (
        RankProgress(
            rank=rank,
            epoch=epoch,
            total=state.size,
            current=state.current,
            completed=state.completed,
            filtered=state.filtered + filtered,
            failed=state.failed + failed,
            inflight=max(0, len(held) - filtered - failed),
            read_ahead=state.read_ahead,
            read_ahead_limit=limit,
            pending=state.pending_count,
            streams=state.open_streams,
            opened=state.next_generation - 1,
            nodes=state.nodes,
            done=state.done,
        ),
        listed,
    )


def iteration_progress(
    record: IterationRecord,
    views: EpochViews,
    rows: Mapping[int, RankRow],
    flows: Mapping[tuple[int, int, int], RankFlow] | None = None,
    ranks: bool = True,
) -> IterationProgress:
    """Where every rank stands in its current epoch (``ranks`` False: totals only).

    ``views``: the iteration's plans under its changes (loaded by the caller). ``rows``:
    each rank's row of its latest epoch (``catalog.latest_rank_states``); a rank without
    one has not started, a rank outside the world now (after a resize) is left out.
    ``flows``: what this server knows of the ranks it serves, by epoch, rank and deal.
    """
    spec = record.spec
    flows = flows or {}
    world = views.world_now
    states = {
        rank: (row.epoch, RankState.from_json(row.state))
        for rank, row in rows.items()
        if row.state is not None and rank < world
    }
    last = max((epoch for epoch, _ in states.values()), default=0)
    listed: list[RankProgress] = []
    inflight: dict[int, list[int]] = {}
    by_rank: dict[int, RankProgress] = {}
    for rank, (epoch, state) in sorted(states.items()):
        flow = flows.get((epoch, rank, state.deal))
        by_rank[rank], positions = _rank(views, rank, epoch, state, flow, ranks)
        if ranks:
            inflight[rank] = positions
    started = list(by_rank.values())
    # a rank that never streamed starts at epoch 0 (a rank a resize added has rows already)
    unstarted = {
        rank: 0 if rank < views.world_size(0) else last
        for rank in range(world)
        if rank not in by_rank
    }
    if ranks:  # every rank listed, those that never streamed too
        for rank, first in unstarted.items():
            fresh = RankState(views.rank_size(first, rank), views.setup.spec.batch_size)
            by_rank[rank] = _rank(views, rank, first, fresh, None, False)[0]
            inflight[rank] = []
        listed = [by_rank[rank] for rank in range(world)]
        counted, unstarted_total = listed, 0
    else:
        counted = started
        unstarted_total = sum(views.rank_size(first, rank) for rank, first in unstarted.items())
    epoch = max((r.epoch for r in counted), default=0)
    all_done = all(r.done for r in counted) and unstarted_total == 0
    entry = views.changes.deal(last)
    carried = entry.deal.carried if entry is not None else Carried()
    mixture = None
    if views.setup.mixture is not None:
        now = {rank: state for rank, (e, state) in states.items() if e == last}
        mixture = mixture_progress(record, views, last, now)
    return IterationProgress(
        id=record.id,
        dataset_id=spec.dataset_id,
        spec=spec,
        seed=record.plan.seed,
        epoch=epoch,
        total=sum(r.total for r in counted) + unstarted_total + carried.finished,
        current=sum(r.current for r in counted) + carried.finished,
        completed=sum(r.completed for r in counted) + carried.completed,
        filtered=sum(r.filtered for r in counted) + carried.filtered,
        failed=sum(r.failed for r in counted) + carried.failed,
        inflight=inflight,
        read_ahead=sum(r.read_ahead for r in counted),
        ranks=listed,
        created_at=record.created_at,
        updated_at=max((row.updated_at for row in rows.values()), default=record.created_at),
        done=all_done and (spec.epochs is None or epoch + 1 >= spec.epochs),
        world_size=world,
        deal=views.deal_number(last),
        mixture=mixture,
    )


def mixture_progress(
    record: IterationRecord, views: EpochViews, epoch: int, states: Mapping[int, RankState]
) -> MixtureProgress:
    """A mixture's sources in ``epoch`` and its weights over time."""
    mixture = views.setup.mixture
    assert mixture is not None
    plan = views.plan(epoch)
    assert isinstance(plan, MixturePlan)
    order = plan.order
    entry = views.changes.deal(epoch)
    deal = entry.deal if entry is not None else None
    base = views.base_plan(epoch)
    finished_runs: list[tuple[int, int]] = []
    reached_runs: list[tuple[int, int]] = []
    for rank, state in states.items():
        partition = views.partition(epoch, rank)
        finished_runs += ranges_to_global(
            deal, base, partition, state.finished.ranges(), plan.batch_size
        )
        seen = state.taken.copy()
        seen.update(state.finished.ranges())
        reached_runs += ranges_to_global(deal, base, partition, seen.ranges(), plan.batch_size)
    finished = order.counts_in(_union(finished_runs))
    reached = order.counts_in(_union(reached_runs))
    if deal is not None:  # what the deals before finished: below the cut, not in the base
        before = order.counts_before(deal.cut) - order.counts_in(deal.base)
        finished, reached = finished + before, reached + before
    frontier = views.frontier(epoch, states)
    weights = order.weights_at(max(0, frontier - 1)) if frontier else order.weights[0]
    on_exhausted = views.setup.spec.on_exhausted
    sources = []
    for index, dataset_id in enumerate(mixture.ids):
        size = mixture.sizes[index]
        drawn = int(reached[index])
        sources.append(
            SourceProgress(
                dataset_id=dataset_id,
                weight=float(weights[index]),
                size=size,
                drawn=drawn,
                finished=int(finished[index]),
                passes=max(1, -(-drawn // size)),
                exhausted=on_exhausted != "cycle" and drawn >= size,
            )
        )
    schedule = [
        WeightChange(
            epoch=0, from_seq=0, weights=dict(zip(mixture.ids, mixture.initial, strict=True)),
            at=record.created_at,
        )
    ] + [
        WeightChange(
            epoch=change.epoch,
            from_seq=change.from_seq,
            weights=dict(zip(mixture.ids, change.weights, strict=True)),
            at=change.at,
        )
        for change in views.changes.weights
    ]  # fmt: skip
    return MixtureProgress(on_exhausted=on_exhausted, sources=sources, schedule=schedule)


def _union(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    if not runs:
        return []
    bounds = np.array(runs, dtype=np.int64).reshape(-1, 2)
    return _merge(bounds[:, 0], bounds[:, 1])
