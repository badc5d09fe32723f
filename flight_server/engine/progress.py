"""Progress of an iteration, as its loops see it, from the rank rows of the catalog.

Works from the stored record alone (``Plans``), so listing iterations never builds a reader;
a server that serves some of the ranks adds what only it knows (``RankFlow``: the samples its
streams dropped inside batches the loop has not completed, the read-ahead window).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ...catalog._progress import RankRow
from ...protocol.iterations import IterationProgress, IterationRecord, RankProgress
from .flow import RankFlow
from .plans import Plans
from .state import RankState

__all__ = ["MAX_LISTED_POSITIONS", "iteration_progress"]

MAX_LISTED_POSITIONS = 1000
"""Dataset positions listed in flight per rank (the first ones)."""


def _rank(
    plans: Plans,
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
        plan = plans.epoch(epoch)
        for a, b in held:
            if len(listed) >= MAX_LISTED_POSITIONS:
                break
            local = np.arange(a, min(b, a + MAX_LISTED_POSITIONS - len(listed)))
            seq = plan.to_global(plans.partitions[rank], local)
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
    plans: Plans,
    rows: Mapping[int, RankRow],
    flows: Mapping[tuple[int, int], RankFlow] | None = None,
    ranks: bool = True,
) -> IterationProgress:
    """Where every rank stands in its current epoch (``ranks`` False: totals only).

    ``rows``: each rank's row of its latest epoch (``catalog.latest_rank_states``); a rank
    without one has not started. ``flows``: what this server knows of the ranks it serves.
    """
    spec = record.spec
    flows = flows or {}
    listed: list[RankProgress] = []
    inflight: dict[int, list[int]] = {}
    started: list[RankProgress] = []
    for rank, row in sorted(rows.items()):
        if row.state is None:
            continue
        state = RankState.from_json(row.state)
        found, positions = _rank(plans, rank, row.epoch, state, flows.get((row.epoch, rank)), ranks)
        started.append(found)
        if ranks:
            inflight[rank] = positions
    by_rank = {r.rank: r for r in started}
    unstarted = [rank for rank in range(spec.world_size) if rank not in by_rank]
    if ranks:  # every rank listed, those that never streamed too
        for rank in unstarted:
            fresh = RankState(plans.rank_size(rank), spec.batch_size)
            by_rank[rank] = _rank(plans, rank, 0, fresh, None, False)[0]
            inflight[rank] = []
        listed = [by_rank[rank] for rank in range(spec.world_size)]
        counted, unstarted_total = listed, 0
    else:
        counted = started
        unstarted_total = sum(plans.rank_size(rank) for rank in unstarted)
    epoch = max((r.epoch for r in counted), default=0)
    all_done = all(r.done for r in counted) and unstarted_total == 0
    return IterationProgress(
        id=record.id,
        dataset_id=spec.dataset_id,
        spec=spec,
        seed=record.plan.seed,
        epoch=epoch,
        total=sum(r.total for r in counted) + unstarted_total,
        current=sum(r.current for r in counted),
        completed=sum(r.completed for r in counted),
        filtered=sum(r.filtered for r in counted),
        failed=sum(r.failed for r in counted),
        inflight=inflight,
        read_ahead=sum(r.read_ahead for r in counted),
        ranks=listed,
        created_at=record.created_at,
        updated_at=max((row.updated_at for row in rows.values()), default=record.created_at),
        done=all_done and (spec.epochs is None or epoch + 1 >= spec.epochs),
    )
