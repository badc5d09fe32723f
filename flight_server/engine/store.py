"""``ProgressStore``: iteration state kept in the catalog, changed one transaction at a time.

Every operation on a rank (open a stream, claim work, release dropped samples, take,
complete, push back, expire) loads the rank's ``RankState`` inside a catalog write
transaction that holds its row, changes it, and writes it back. So any number of servers
sharing one catalog act as one: a sample claimed or finished through one server is never
handed out by another, and a server that restarts finds every rank where it was.

Claims cover many batches (the stream asks for as much as its read-ahead budget allows), so
a transaction is paid per claim and per bulk acknowledgement, never per sample or batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ...catalog import Catalog, EpochRows
from ...catalog._progress import RankRow
from ...protocol.errors import InvalidArgument, IterationConflict
from .state import Claim, RankState, StreamKey
from .world import World

__all__ = ["ProgressStore", "StreamHandle"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Sizes = Callable[[int], int]
"""Samples of a rank in an epoch, by rank (the same for every epoch)."""


@dataclass(frozen=True)
class StreamHandle:
    """One stream as the store knows it: which rank and epoch, which worker, which turn."""

    iteration_id: str
    epoch: int
    rank: int
    key: StreamKey
    generation: int
    deal: int = 0
    """The deal of the epoch the stream's local seqs are of."""


class ProgressStore:
    """Iteration state in the catalog, for the streams and acks of one server (``node``).

    Args:
        catalog: where the state lives (shared by every server of the service).
        node: this server's id; the streams it opens are marked with it.
        lease_seconds: how long a stream's samples stay its own without a renewal (the
            server renews the leases of its open streams; see ``renew``).
        clock: wall-clock seconds (shared by servers, unlike a monotonic clock).
    """

    def __init__(
        self,
        catalog: Catalog,
        node: str,
        lease_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.node = node
        self.lease_seconds = lease_seconds
        self.clock = clock

    # -- one transaction over some ranks -------------------------------------------------

    def _change(
        self,
        iteration_id: str,
        epoch: int,
        ranks: Sequence[int],
        change: Callable[[dict[int, RankState | None]], object],
        sizes: Sizes | None = None,
        batch_size: int | None = None,
        version: int | None = None,
    ) -> object:
        """Run ``change`` on the states of ``ranks`` inside one transaction and save them.

        With ``sizes`` and ``batch_size``, a rank without a row yet starts empty; without
        them it is given as None. With ``version``, the iteration must still be at it
        (``VersionChanged`` otherwise: the caller's plans are stale).
        """

        def apply(rows: dict[int, RankRow]) -> object:
            states: dict[int, RankState | None] = {}
            for rank, row in rows.items():
                if row.state is not None:
                    states[rank] = RankState.from_json(row.state)
                elif sizes is not None and batch_size is not None:
                    states[rank] = RankState(size=sizes(rank), batch_size=batch_size)
                else:
                    states[rank] = None
            result = change(states)
            for rank, state in states.items():
                if state is not None:
                    rows[rank].set(state.to_json(), state.expires_at, state.nodes)
            return result

        return self.catalog.update_rank_states(iteration_id, epoch, ranks, apply, version)

    def _one(
        self,
        handle: StreamHandle,
        change: Callable[[RankState], object],
        version: int | None = None,
    ) -> object:
        def apply(states: dict[int, RankState | None]) -> object:
            state = states[handle.rank]
            if state is None:
                raise InvalidArgument(
                    f"rank {handle.rank} of iteration {handle.iteration_id} has no epoch "
                    f"{handle.epoch} yet"
                )
            return change(state)

        return self._change(
            handle.iteration_id, handle.epoch, [handle.rank], apply, version=version
        )

    # -- streams -------------------------------------------------------------------------

    def open_stream(
        self,
        iteration_id: str,
        epoch: int,
        rank: int,
        key: StreamKey,
        sizes: Sizes,
        batch_size: int,
        start: Callable[[int], RankState | None] | None = None,
        version: int | None = None,
        deal: int = 0,
        takeover: bool = False,
    ) -> StreamHandle:
        """Start a stream of a rank's epoch (creating the epoch's state when it is new).

        An earlier stream of the same worker is over: what it held goes back to the queue;
        with ``takeover``, every other session's stream of the rank too (see
        ``RankState.open_stream``). ``start`` may give the state a rank begins an epoch
        with (progress carried over from an older catalog). ``version`` and ``deal``: the
        changes the caller's plans are of (``VersionChanged`` when the iteration changed
        since).
        """
        now = self.clock()

        def apply(states: dict[int, RankState | None]) -> int:
            state = states[rank]
            if state is None:
                state = (start(rank) if start else None) or RankState(
                    sizes(rank), batch_size, deal=deal
                )
                states[rank] = state
            elif state.done and state.size:
                raise InvalidArgument(
                    f"rank {rank} finished epoch {epoch} already: iterate again for epoch "
                    f"{epoch + 1} (or set_epoch({epoch + 1}))"
                )
            state.expire(now)
            return state.open_stream(key, self.node, now + self.lease_seconds, takeover)

        generation = self._change(iteration_id, epoch, [rank], apply, version=version)
        assert isinstance(generation, int)
        return StreamHandle(iteration_id, epoch, rank, key, generation, deal)

    def claim(
        self, handle: StreamHandle, world: World, max_chunks: int, version: int | None = None
    ) -> Claim | None:
        """Work for a stream, held by it from now on (None: the stream was superseded).

        ``version``: the changes the stream's plan is of (``VersionChanged`` when the
        iteration changed since: look again before mapping anything).
        """
        now = self.clock()

        def apply(state: RankState) -> Claim | None:
            state.expire(now)
            stream = state.stream(handle.key, handle.generation)
            if stream is None or state.deal != handle.deal:
                return None
            stream.lease_until = now + self.lease_seconds
            return state.claim(stream, world, max_chunks)

        found = self._one(handle, apply, version)
        assert found is None or isinstance(found, Claim)
        return found

    def release(
        self, handle: StreamHandle, ranges: list[tuple[int, int]], filtered: int, failed: int
    ) -> None:
        """Samples a stream dropped where no batch will span them: finished, and counted."""
        if not ranges:
            return

        def apply(state: RankState) -> None:
            stream = state.stream(handle.key, handle.generation)
            if stream is not None:
                state.release(stream, ranges, filtered, failed)

        self._one(handle, apply)

    def end_stream(self, handle: StreamHandle, orphan: bool = False) -> int:
        """The stream is over: what it held and nobody finished returns to the queue.

        ``orphan``: its client went away mid-stream, so any worker of the rank may take it.
        """
        return self.end_streams([handle], orphan)

    def finish_stream(self, handle: StreamHandle) -> None:
        """The stream sent all its work (see ``RankState.finish_stream``)."""

        def apply(state: RankState) -> None:
            if state.stream(handle.key, handle.generation) is not None:
                state.finish_stream(handle.key)

        self._one(handle, apply)

    def release_node(self) -> int:
        """Return what every stream of this server holds to pending (it is stopping)."""
        freed = 0
        for iteration_id, epoch, rank in self.catalog.rank_states_to_expire(
            float("-inf"), [self.node]
        ):

            def apply(states: dict[int, RankState | None], rank: int = rank) -> int:
                state = states[rank]
                if state is None:
                    return 0
                return state.expire(float("-inf"), frozenset({self.node}), orphan=False)

            try:
                found = self._change(iteration_id, epoch, [rank], apply)
            except Exception as exc:  # deleted meanwhile
                log.debug("releasing %s/%d/%d failed: %s", iteration_id, epoch, rank, exc)
                continue
            assert isinstance(found, int)
            freed += found
        return freed

    def end_streams(self, handles: Sequence[StreamHandle], orphan: bool = False) -> int:
        """End several streams (a transaction per rank); how many samples went back."""
        groups: dict[tuple[str, int, int], dict[StreamKey, int]] = {}
        for h in handles:
            groups.setdefault((h.iteration_id, h.epoch, h.rank), {})[h.key] = h.generation
        total = 0
        for (iteration_id, epoch, rank), streams in groups.items():

            def apply(
                states: dict[int, RankState | None],
                streams: dict[StreamKey, int] = streams,
                rank: int = rank,
            ) -> int:
                state = states[rank]
                if state is None:
                    return 0
                return sum(
                    state.end_stream(key, orphan)
                    for key, generation in streams.items()
                    if state.stream(key, generation) is not None
                )

            found = self._change(iteration_id, epoch, [rank], apply)
            assert isinstance(found, int)
            total += found
        return total

    def renew(self, handles: Sequence[StreamHandle]) -> None:
        """Extend the leases of open streams (a transaction per rank they belong to)."""
        groups: dict[tuple[str, int, int], dict[StreamKey, int]] = {}
        for h in handles:
            groups.setdefault((h.iteration_id, h.epoch, h.rank), {})[h.key] = h.generation
        until = self.clock() + self.lease_seconds
        for (iteration_id, epoch, rank), streams in groups.items():

            def apply(
                states: dict[int, RankState | None],
                streams: dict[StreamKey, int] = streams,
                rank: int = rank,
            ) -> None:
                state = states[rank]
                if state is not None:
                    state.renew(streams, until)

            try:
                self._change(iteration_id, epoch, [rank], apply)
            except Exception as exc:  # a deleted iteration, a catalog hiccup: next round
                log.debug("renewing leases of %s failed: %s", iteration_id, exc)

    # -- what loops report ---------------------------------------------------------------

    def ack(
        self,
        iteration_id: str,
        epoch: int,
        rank: int,
        taken: list[tuple[int, int]],
        completed: list[tuple[int, int]],
        filtered: int = 0,
        failed: int = 0,
        deal: int | None = None,
    ) -> tuple[int, RankState]:
        """Record what a rank's loop took and completed.

        Answers the delivered samples newly completed, and the state after the change.
        ``deal``: the deal the ranges are of (None: the rank's current one).

        Raises:
            IterationConflict: the ranges are of a deal the epoch was dealt anew since.
        """

        def apply(states: dict[int, RankState | None]) -> tuple[int, RankState]:
            state = states[rank]
            if state is None:
                if taken or completed:
                    raise InvalidArgument(
                        f"rank {rank} of iteration {iteration_id} was sent nothing in epoch "
                        f"{epoch}: acknowledge only the seq ranges of batches received"
                    )
                raise InvalidArgument(f"rank {rank} has not started epoch {epoch}")
            if deal is not None and deal != state.deal:
                raise IterationConflict(
                    f"iteration {iteration_id} was resumed with another world size since "
                    f"these batches were sent (epoch {epoch} deal {deal}, now {state.deal}): "
                    "this loop belongs to the old world; stop it (its batches not completed "
                    "are dealt to the new ranks)"
                )
            state.take(taken)
            return state.complete(completed, filtered, failed), state

        found = self._change(iteration_id, epoch, [rank], apply)
        assert isinstance(found, tuple)
        return found

    def pushback(self, iteration_id: str, epochs: dict[int, int]) -> int:
        """Return everything held by the streams of ranks to the queue; how many samples.

        ``epochs`` gives the epoch of each rank to push back.
        """
        by_epoch: dict[int, list[int]] = {}
        for rank, epoch in epochs.items():
            by_epoch.setdefault(epoch, []).append(rank)
        total = 0
        for epoch, ranks in by_epoch.items():

            def apply(states: dict[int, RankState | None]) -> int:
                return sum(s.pushback() for s in states.values() if s is not None)

            found = self._change(iteration_id, epoch, ranks, apply)
            assert isinstance(found, int)
            total += found
        return total

    def expire(self, dead_nodes: Sequence[str] = ()) -> int:
        """Free the samples of streams whose lease ran out or whose server died; how many.

        Looks at every iteration on the catalog.
        """
        now = self.clock()
        dead = frozenset(dead_nodes)
        freed = 0
        for iteration_id, epoch, rank in self.catalog.rank_states_to_expire(now, list(dead)):

            def apply(states: dict[int, RankState | None], rank: int = rank) -> int:
                state = states[rank]
                return state.expire(now, dead) if state is not None else 0

            try:
                found = self._change(iteration_id, epoch, [rank], apply)
            except Exception as exc:  # deleted meanwhile
                log.debug("expiring %s/%d/%d failed: %s", iteration_id, epoch, rank, exc)
                continue
            assert isinstance(found, int)
            if found:
                log.info(
                    "iteration %s rank %d: %d samples of a stream gone silent go back to "
                    "the queue", iteration_id, rank, found,
                )  # fmt: skip
            freed += found
        return freed

    # -- changes ---------------------------------------------------------------------------

    def change_epoch(self, iteration_id: str, epoch: int, change: Callable[[EpochRows], T]) -> T:
        """Run ``change`` on every state row of an epoch, the iteration held alone.

        See ``Catalog.change_epoch``: a change of weights or world size is made there.
        """
        return self.catalog.change_epoch(iteration_id, epoch, change)

    # -- reading -------------------------------------------------------------------------

    def latest(self, iteration_id: str) -> dict[int, tuple[int, RankState]]:
        """Each rank's latest epoch and its state there (ranks that never streamed: absent)."""
        return {
            rank: (row.epoch, RankState.from_json(row.state))
            for rank, row in self.catalog.latest_rank_states(iteration_id).items()
            if row.state is not None
        }

    def state(self, iteration_id: str, epoch: int, rank: int) -> RankState | None:
        """One rank's state in one epoch (None: it has not started it)."""
        for row in self.catalog.load_rank_states(iteration_id, epoch):
            if row.rank == rank and row.state is not None:
                return RankState.from_json(row.state)
        return None
