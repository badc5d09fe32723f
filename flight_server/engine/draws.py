"""``MixtureOrder``: which source each sample of a mixture's epoch is drawn from.

A mixture's epoch is a sequence of draws, one per global sequence number ``g``. Draw ``g``
takes a uniform number from a counter-based generator of ``(seed, epoch, g)`` (splitmix64:
no state to carry, so any ``g`` is drawn alone and the same on every server) and picks a
source by the weights in force at ``g``. The ``k``-th draw of source ``s`` is sample ``k``
of that source's own order (its ``EpochPlan``; pass ``k // size`` under ``"cycle"``).

The weights in force come from a *schedule*: ``(from_seq, weights)`` entries, the first
from 0 (live weight changes add entries). When an epoch ends, by ``on_exhausted``:

- ``"stop"``: right after the draw that takes a source's last sample (the first source to
  run out ends the epoch; no sample is repeated);
- ``"cycle"``: a source that runs out starts its next pass (reshuffled); the epoch ends
  right after the draw that completes the first pass of the last source to complete one
  (sources whose weight is 0 then do not hold it open);
- ``"rebalance"``: a source that runs out leaves, the others go on with their weights
  renormalized; the epoch ends when every source of positive weight ran out.

The draws are scanned block by block (``BLOCK`` seqs): the per-source counts at each block
start are kept (a few integers a block), so mapping any seqs costs the blocks they fall
in, not the epoch before them; the first mapping past a block scans the blocks before it
once (about 25 ms per million seqs on one core). ``total`` (the epoch's length) needs the
scan up to the end unless it has a closed form (``"rebalance"`` with every weight positive:
the sum of the sources' sizes). With live weights ``total`` is what the weights in force
now give; a change re-scans from where it takes effect.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ...protocol.errors import InvalidArgument

__all__ = ["BLOCK", "MAX_EPOCH", "MixtureOrder", "OnExhausted", "epoch_key", "uniforms"]

OnExhausted = Literal["stop", "cycle", "rebalance"]

BLOCK = 1 << 16
"""Seqs per scanned block (the unit of the prefix counts and of the choices kept)."""
MAX_EPOCH = 1 << 34
"""The longest mixture epoch (draws): past it a weight is too small for its mode."""
BLOCKS_KEPT = 16

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's output function (a bijection of 64-bit integers, well spread)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64, copy=True)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        return z


def epoch_key(seed: int, epoch: int) -> int:
    """The generator key of one epoch of a mixture."""
    parts = np.array([seed & ((1 << 64) - 1), epoch + 0x5EED], dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = _mix(parts)
        return int(_mix(np.array([mixed[0] ^ (mixed[1] * _GOLDEN)], dtype=np.uint64))[0])


def uniforms(key: int, start: int, stop: int) -> np.ndarray:
    """Draws ``start .. stop - 1`` of an epoch: uniform floats in [0, 1)."""
    counter = np.arange(start + 1, stop + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _mix(np.uint64(key) + counter * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class _State:
    """Where the draws stand at a block start: counts per source, which ran out, the end."""

    counts: np.ndarray
    done: np.ndarray
    """``rebalance``: ran out; ``cycle``: completed a pass; ``stop``: unused."""
    end: int | None
    """The epoch's length, when it ended before this block start."""


class MixtureOrder:
    """The draws of one epoch of a mixture under one schedule (see the module docstring).

    Args:
        sizes: samples per pass of each source.
        schedule: ``(from_seq, weights)`` entries, ascending, the first from 0.
        mode: ``on_exhausted``.
        key: the epoch's generator key (``epoch_key``).
        version: the iteration change version this schedule is of (for those who cache).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        schedule: Sequence[tuple[int, Sequence[float]]],
        mode: OnExhausted,
        key: int,
        version: int = 0,
    ) -> None:
        self.sizes = np.asarray([int(n) for n in sizes], dtype=np.int64)
        if len(self.sizes) == 0 or (self.sizes <= 0).any():
            raise InvalidArgument("every source of a mixture needs at least one sample")
        entries: dict[int, tuple[float, ...]] = {}
        for start, weights in schedule:
            entries[int(start)] = check_weights(weights, len(self.sizes))
        if 0 not in entries:
            raise InvalidArgument("a mixture schedule starts at seq 0")
        self.starts = sorted(entries)
        self.weights = [np.asarray(entries[s], dtype=np.float64) for s in self.starts]
        self.mode: OnExhausted = mode
        self.key = key
        self.version = version
        self._states: list[_State] = [
            _State(np.zeros(len(self.sizes), np.int64), np.zeros(len(self.sizes), bool), None)
        ]
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._total: int | None = None
        self._lock = threading.RLock()

    @property
    def num_sources(self) -> int:
        """How many sources are mixed."""
        return len(self.sizes)

    @property
    def schedule(self) -> list[tuple[int, tuple[float, ...]]]:
        """The ``(from_seq, weights)`` entries of this order."""
        return [
            (s, tuple(float(x) for x in w)) for s, w in zip(self.starts, self.weights, strict=True)
        ]

    def weights_at(self, seq: int) -> np.ndarray:
        """The weights in force at ``seq``."""
        return self.weights[bisect.bisect_right(self.starts, seq) - 1]

    # -- changes -------------------------------------------------------------------------

    def changed(self, from_seq: int, weights: Sequence[float], version: int) -> MixtureOrder:
        """The order with new weights from ``from_seq`` on (what comes before is kept).

        The scan of the blocks before ``from_seq`` is shared: only what follows is redone.
        """
        kept = [(s, w) for s, w in self.schedule if s < from_seq]
        other = MixtureOrder(
            self.sizes.tolist(), [*kept, (from_seq, weights)], self.mode, self.key, version
        )
        with self._lock:
            last = from_seq // BLOCK  # states at block starts up to from_seq are the same
            other._states = list(self._states[: last + 1])
            for block, found in self._blocks.items():
                if (block + 1) * BLOCK <= from_seq:
                    other._blocks[block] = found
        return other

    # -- scanning ------------------------------------------------------------------------

    def _next_start(self, seq: int) -> int:
        i = bisect.bisect_right(self.starts, seq)
        return self.starts[i] if i < len(self.starts) else 1 << 62

    def _scan(self, block: int, state: _State) -> tuple[np.ndarray, _State]:
        """The sources drawn in one block, and the state at the next block start."""
        lo = block * BLOCK
        if state.end is not None:
            return np.zeros(0, np.int16), state
        u = uniforms(self.key, lo, lo + BLOCK)
        counts, done = state.counts.copy(), state.done.copy()
        out = np.empty(BLOCK, dtype=np.int16)
        pos, end = lo, None
        sources = np.arange(self.num_sources)
        while pos < lo + BLOCK:
            stop = min(lo + BLOCK, self._next_start(pos))
            raw = self.weights_at(pos)
            weights = raw.copy()
            if self.mode == "rebalance":
                weights[done] = 0.0
            if self.mode == "cycle" and bool(np.all(done | (raw == 0))):
                end = pos
                break
            total = weights.sum()
            if total <= 0:
                end = pos
                break
            cum = np.cumsum(weights) / total
            cum[int(np.flatnonzero(weights > 0)[-1]) :] = 1.0
            picked = _pick(cum, u[pos - lo : stop - lo])
            found = np.bincount(picked, minlength=self.num_sources)
            need = self.sizes - counts
            events: list[tuple[int, int]] = []  # (index in picked of the draw, source)
            watch = ~done if self.mode != "stop" else np.ones(self.num_sources, bool)
            for s in sources[watch & (found >= need) & (weights > 0)]:
                at = np.flatnonzero(picked == s)[int(need[s]) - 1]
                events.append((int(at), int(s)))
            events.sort()
            cut = len(picked)
            if events and self.mode == "stop":
                cut, end = events[0][0] + 1, pos + events[0][0] + 1
            elif events and self.mode == "rebalance":
                cut = events[0][0] + 1
                done[events[0][1]] = True
            elif events:  # cycle: passes complete; the epoch ends when the last one does
                for at, s in events:
                    done[s] = True
                    if bool(np.all(done | (raw == 0))):
                        cut, end = at + 1, pos + at + 1
                        break
            taken = picked[:cut]
            out[pos - lo : pos - lo + cut] = taken
            counts += np.bincount(taken, minlength=self.num_sources)
            pos += cut
            if end is not None:
                break
        if end is not None:
            return out[: end - lo], _State(counts, done, end)
        return out, _State(counts, done, None)

    def _state(self, block: int) -> _State:
        """The state at a block start (scanning the blocks before it once)."""
        with self._lock:
            while len(self._states) <= block:
                number = len(self._states) - 1
                if number * BLOCK > MAX_EPOCH:
                    raise InvalidArgument(
                        f"this mixture's epoch would be longer than {MAX_EPOCH:,} samples: a "
                        "source's weight is too small for on_exhausted="
                        f"{self.mode!r}; raise it, or use 'stop' or 'rebalance'"
                    )
                _, after = self._scan(number, self._states[number])
                self._states.append(after)
            return self._states[block]

    def _keep(self, block: int, picked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # rank of each draw among the block's draws of its source
        order = np.argsort(picked, kind="stable")
        counts = np.bincount(picked, minlength=self.num_sources)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        ranks = np.empty(len(picked), dtype=np.int64)
        ranks[order] = np.arange(len(picked)) - np.repeat(starts, counts)
        found = (picked, ranks)
        self._blocks[block] = found
        while len(self._blocks) > BLOCKS_KEPT:
            self._blocks.popitem(last=False)
        return found

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """A block's drawn sources and each draw's rank among its source's draws there."""
        with self._lock:
            found = self._blocks.get(block)
            if found is not None:
                self._blocks.move_to_end(block)
                return found
            state = self._state(block)
            picked, _ = self._scan(block, state)
            return self._keep(block, picked)

    # -- what it answers -----------------------------------------------------------------

    @property
    def total(self) -> int:
        """Draws in the epoch under this schedule."""
        if self._total is None:
            last = self.weights[-1]
            if self.mode == "rebalance" and bool((last > 0).all()):
                self._total = int(self.sizes.sum())  # every source runs out at last
            else:
                if self.mode == "cycle":
                    share = last / last.sum()
                    longest = max(
                        float(n) / float(p) for n, p in zip(self.sizes, share, strict=True) if p
                    )
                    if longest > MAX_EPOCH:
                        raise InvalidArgument(
                            f"this mixture's epoch would be about {longest:,.0f} samples "
                            f"(more than {MAX_EPOCH:,}): a source's weight is too small for "
                            "on_exhausted='cycle'; raise it, or use 'stop' or 'rebalance'"
                        )
                block = 0
                while (end := self._state(block).end) is None:
                    block += 1
                self._total = end
        return self._total

    def locate(self, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For seqs of the epoch (any order): the source of each and its draw number there."""
        seq = np.asarray(seq, dtype=np.int64)
        source = np.empty(len(seq), dtype=np.int16)
        draw = np.empty(len(seq), dtype=np.int64)
        if not len(seq):
            return source, draw
        order = None if bool((np.diff(seq) >= 0).all()) else np.argsort(seq, kind="stable")
        ordered = seq if order is None else seq[order]
        blocks = ordered // BLOCK
        cuts = np.flatnonzero(np.diff(blocks)) + 1
        bounds = [0, *cuts.tolist(), len(ordered)]
        for a, b in itertools.pairwise(bounds):
            block = int(blocks[a])
            picked, ranks = self._block(block)
            offset = ordered[a:b] - block * BLOCK
            if int(offset[-1]) >= len(picked) or int(offset[0]) < 0:
                raise InvalidArgument(f"seq {int(ordered[b - 1])} is past the mixture's epoch")
            found = picked[offset]
            where = slice(a, b) if order is None else order[a:b]
            source[where] = found
            draw[where] = self._state(block).counts[found] + ranks[offset]
        return source, draw

    def counts_before(self, seq: int) -> np.ndarray:
        """Draws of each source in ``[0, seq)``."""
        block, offset = divmod(int(seq), BLOCK)
        state = self._state(block)
        if not offset:
            return state.counts.copy()
        picked, _ = self._block(block)
        return state.counts + np.bincount(picked[:offset], minlength=self.num_sources)

    def counts_in(self, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
        """Draws of each source in the given ``[start, stop)`` ranges of seqs.

        Vectorized by block: a block holding many range ends is looked at once.
        """
        found = np.zeros(self.num_sources, dtype=np.int64)
        if not len(ranges):
            return found
        bounds = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        ends = np.concatenate((bounds[:, 1], bounds[:, 0]))
        signs = np.concatenate((np.ones(len(bounds), np.int64), -np.ones(len(bounds), np.int64)))
        blocks = ends // BLOCK
        for block in np.unique(blocks).tolist():
            mask = blocks == block
            offsets, sign = ends[mask] - block * BLOCK, signs[mask]
            found += self._state(block).counts * int(sign.sum())
            if not bool((offsets > 0).any()):
                continue
            picked, _ = self._block(block)
            for source in range(self.num_sources):
                where = np.flatnonzero(picked == source)
                found[source] += int((np.searchsorted(where, offsets) * sign).sum())
        return found


def _pick(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The source of each uniform draw: how many cumulative shares are <= it."""
    if len(cum) > 16:
        return np.searchsorted(cum, u, side="right").astype(np.int16)
    picked = np.zeros(len(u), dtype=np.int16)
    for edge in cum[:-1]:  # a few comparisons beat a binary search per draw
        picked += u >= edge
    return picked


def check_weights(weights: Sequence[float], sources: int) -> tuple[float, ...]:
    """Weights as floats, one per source, each finite and >= 0, not all 0; else a clear error."""
    values = tuple(float(w) for w in weights)
    if len(values) != sources:
        raise InvalidArgument(f"{len(values)} weights for {sources} mixture sources")
    for index, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(
                f"mixture weight {value!r} of source {index} must be a finite number >= 0"
            )
    if not any(values):
        raise InvalidArgument("mixture weights are all 0: give at least one source a weight > 0")
    return values
