"""``Deal``: an epoch dealt anew to another number of ranks (elastic resume).

Deal 0 of an epoch is the world it started with: chunk ``j`` of the epoch's order goes to
partition ``j % partitions`` (``plan``). Resizing the world makes the epoch's next deal: its
*base* is every global seq not finished yet (pending, orphaned, held by the old world's
streams, never handed out), laid end to end in order, and the base is cut into chunks of
``batch_size`` dealt round-robin to the new ranks, as deal 0 deals the epoch. A new rank's
local seq ``l`` is base element ``((l // batch) * world + rank) * batch + l % batch``.

The base is kept small: the explicit seqs below ``cut`` (the old world's stragglers,
fragments of what was in flight) and everything from ``cut`` to the epoch's end (what no
rank had reached), so it costs the stragglers, not the epoch. Its end is the epoch's
``available`` total as it is when asked (a mixture's can change with its weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...protocol.ranges import RangeSet, runs
from .state import RankState

__all__ = ["Carried", "Deal", "deal_anew", "local_runs", "ranges_to_global"]


@dataclass(frozen=True)
class Carried:
    """What the deals before this one finished: counted in the epoch's progress."""

    finished: int = 0
    """Seqs finished (delivered, filtered and failed together)."""
    completed: int = 0
    filtered: int = 0
    failed: int = 0

    def to_json(self) -> dict[str, int]:
        """The JSON form kept with the deal."""
        return {
            "finished": self.finished,
            "completed": self.completed,
            "filtered": self.filtered,
            "failed": self.failed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Carried:
        """Rebuild from the JSON form."""
        return cls(**{k: int(data.get(k, 0)) for k in ("finished", "completed", "filtered",
                                                       "failed")})  # fmt: skip


@dataclass(frozen=True)
class Deal:
    """One deal after the first: the base and the world it is dealt to (see module doc)."""

    number: int
    world_size: int
    batch_size: int
    base: tuple[tuple[int, int], ...]
    """Explicit global seqs below ``cut``, as sorted disjoint ranges."""
    cut: int
    drop_last: bool = False
    carried: Carried = field(default_factory=Carried)
    _starts: np.ndarray = field(init=False, repr=False, compare=False)
    _ends: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lengths = np.array([b - a for a, b in self.base], dtype=np.int64)
        object.__setattr__(self, "_ends", np.cumsum(lengths))
        object.__setattr__(self, "_starts", np.array([a for a, _ in self.base], np.int64))

    @property
    def explicit(self) -> int:
        """Seqs of the base below ``cut``."""
        return int(self._ends[-1]) if len(self._ends) else 0

    def length(self, available: int) -> int:
        """Seqs the deal hands out, for an epoch of ``available`` seqs.

        With ``drop_last`` only whole batches for every rank (the rest is dropped, as
        ``drop_last`` drops an epoch's tail).
        """
        found = self.explicit + max(0, available - self.cut)
        if self.drop_last:
            per_round = self.batch_size * self.world_size
            found = found // per_round * per_round
        return found

    def partition_size(self, partition: int, available: int) -> int:
        """Samples one rank of the deal delivers."""
        total, batch, world = self.length(available), self.batch_size, self.world_size
        chunks = len(range(partition, -(-total // batch), world))
        if chunks == 0:
            return 0
        last = partition + (chunks - 1) * world
        return (chunks - 1) * batch + min(total, (last + 1) * batch) - last * batch

    def indices(self, partition: int, local: np.ndarray) -> np.ndarray:
        """Base indices of a rank's local seqs."""
        chunk, offset = np.divmod(np.asarray(local, dtype=np.int64), self.batch_size)
        return (chunk * self.world_size + partition) * self.batch_size + offset

    def at(self, index: np.ndarray) -> np.ndarray:
        """The global seqs of base indices."""
        index = np.asarray(index, dtype=np.int64)
        out = self.cut + (index - self.explicit)
        inside = index < self.explicit
        if inside.any():
            which = np.searchsorted(self._ends, index[inside], side="right")
            before = np.where(which > 0, self._ends[np.maximum(which - 1, 0)], 0)
            out[inside] = self._starts[which] + index[inside] - before
        return out

    def to_global(self, partition: int, local: np.ndarray) -> np.ndarray:
        """Global seqs of a rank's local seqs."""
        return self.at(self.indices(partition, local))

    def to_json(self) -> dict[str, Any]:
        """The JSON form kept in the catalog."""
        return {
            "deal": self.number,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "base": [list(r) for r in self.base],
            "cut": self.cut,
            "drop_last": self.drop_last,
            "carried": self.carried.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Deal:
        """Rebuild a deal from its JSON form."""
        return cls(
            number=int(data["deal"]),
            world_size=int(data["world_size"]),
            batch_size=int(data["batch_size"]),
            base=tuple((int(a), int(b)) for a, b in data["base"]),
            cut=int(data["cut"]),
            drop_last=bool(data.get("drop_last", False)),
            carried=Carried.from_json(data.get("carried") or {}),
        )


def local_runs(
    mapping: Any, partition: int, ranges: Sequence[tuple[int, int]], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A rank's local ranges cut at chunk ends, each piece's start mapped by ``mapping``.

    A piece of one chunk is a run in the dealt order, so ``(start, start + length)`` are
    its runs there (``mapping``: a deal-0 plan, or a later deal's base indices).
    """
    starts: list[np.ndarray] = []
    stops: list[np.ndarray] = []
    for a, b in ranges:
        if b <= a:
            continue
        first, last = a // batch_size, (b - 1) // batch_size
        chunks = np.arange(first, last + 1, dtype=np.int64)
        lo = np.maximum(chunks * batch_size, a)
        hi = np.minimum((chunks + 1) * batch_size, b)
        starts.append(lo)
        stops.append(hi)
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    lo, hi = np.concatenate(starts), np.concatenate(stops)
    base = mapping.to_global(partition, lo)
    return base, base + (hi - lo)


def _merge(lo: np.ndarray, hi: np.ndarray) -> list[tuple[int, int]]:
    """Sorted disjoint runs of possibly touching/overlapping runs."""
    if not len(lo):
        return []
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    reach = np.maximum.accumulate(hi)
    breaks = np.flatnonzero(lo[1:] > reach[:-1]) + 1
    firsts = np.concatenate(([0], breaks))
    lasts = np.concatenate((breaks, [len(lo)])) - 1
    return list(zip(lo[firsts].tolist(), reach[lasts].tolist(), strict=True))


def ranges_to_global(
    deal: Deal | None,
    plan: Any,
    partition: int,
    ranges: Sequence[tuple[int, int]],
    batch_size: int,
) -> list[tuple[int, int]]:
    """A rank's local ranges as sorted disjoint global runs (numpy all the way).

    Deal 0 (``deal`` None): each chunk piece is one global run. A later deal: each piece is
    a run of base indices, split where the base's explicit ranges break.
    """
    if deal is None:
        return _merge(*local_runs(plan, partition, ranges, batch_size))
    lo, hi = local_runs(_Indices(deal), partition, ranges, batch_size)
    if not len(lo):
        return []
    # split index runs at the base's range ends, then map each piece's start
    cuts = deal._ends[:-1] if len(deal._ends) else deal._ends
    edges = np.concatenate((cuts, [deal.explicit]))
    pieces_lo: list[int] = []
    pieces_hi: list[int] = []
    for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
        inner = edges[(edges > a) & (edges < b)]
        bounds = [a, *inner.tolist(), b]
        pieces_lo.extend(bounds[:-1])
        pieces_hi.extend(bounds[1:])
    start = deal.at(np.array(pieces_lo, dtype=np.int64))
    return _merge(start, start + (np.array(pieces_hi) - np.array(pieces_lo)))


class _Indices:
    """A deal seen as a mapping to base indices (for ``local_runs``)."""

    def __init__(self, deal: Deal) -> None:
        self.deal = deal

    def to_global(self, partition: int, local: np.ndarray) -> np.ndarray:
        return self.deal.indices(partition, local)


def _below(count_local: int, batch: int, world: int, partition: int, limit: int) -> int:
    """How many of a partition's first seqs fall below index ``limit`` of the dealt order."""
    rounds, rest = divmod(limit, batch * world)
    return min(count_local, rounds * batch + min(max(rest - partition * batch, 0), batch))


def deal_anew(
    states: dict[int, RankState],
    old: Deal | None,
    plan: Any,
    partitions: int,
    world_size: int,
    batch_size: int,
    drop_last: bool,
) -> Deal:
    """The next deal of an epoch: what the ranks' states did not finish, to ``world_size``.

    ``states`` are every rank of the old world (by partition; a rank that never streamed
    is an empty state of its size), ``old`` its deal (None: deal 0, the chunks of ``plan``,
    a plan without a deal, over ``partitions``).
    Every seq below the new ``cut`` that no rank finished is in the base, and nothing at or
    past it was handed out: the base is exactly what is left.
    """
    cut = old.cut if old is not None else 0
    for partition, state in states.items():
        if state.covered:
            last = state.covered.ranges()[-1][1] - 1
            seq = (old or plan).to_global(partition, np.array([last], dtype=np.int64))
            cut = max(cut, int(seq[0]) + 1)
    # the order's index of `cut` (deal 0: the seq itself; later: explicit + tail offset)
    if old is None:
        limit = cut
    else:
        limit = old.explicit + max(0, cut - old.cut)
    unfinished = RangeSet()
    for partition, state in states.items():
        world = partitions if old is None else old.world_size
        below = _below(state.size, batch_size, world, partition, limit)
        gaps = state.finished.gaps(0, below)
        if not gaps:
            continue
        local = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in gaps])
        seqs = np.sort((old or plan).to_global(partition, local))
        found = runs(seqs)
        assert found is not None
        unfinished.update(found)
    before = old.carried if old is not None else Carried()
    carried = Carried(
        finished=before.finished + sum(len(s.finished) for s in states.values()),
        completed=before.completed + sum(s.completed for s in states.values()),
        filtered=before.filtered + sum(s.filtered for s in states.values()),
        failed=before.failed + sum(s.failed for s in states.values()),
    )
    return Deal(
        number=(old.number if old else 0) + 1,
        world_size=world_size,
        batch_size=batch_size,
        base=tuple(unfinished.ranges()),
        cut=cut,
        drop_last=drop_last,
        carried=carried,
    )
