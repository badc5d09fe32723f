"""``StreamWork``: what a batcher does for one stream of a live iteration.

Claims through the store within the read-ahead budget (a windowed stream waits for room:
its loop's pace and its share of the rank's window), reloads the iteration's changes when
a claim finds it at another version, drains at the end, releases what it sent back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...catalog import VersionChanged
from ...protocol.errors import IterationConflict, IterationNotFound, StorageError
from .flow import RankFlow
from .state import Unit
from .store import StreamHandle
from .world import World

if TYPE_CHECKING:
    from .live import LiveIteration

__all__ = ["WAIT_SECONDS", "CatalogLost", "Stopped", "StreamWork", "Superseded"]

log = logging.getLogger(__name__)

UNBOUNDED = 1 << 62
WAIT_SECONDS = 0.25
"""How often a stream waiting on its budget looks at the catalog (acks through another
server, a pushback)."""
CHECK_SECONDS = 0.01
"""How often it looks at whether it should stop (its client gone: the blocks it was
having gathered are abandoned as soon as it ends). At 50 ms, a job that closed one
iteration and opened the next found the old one's gathers holding both ``cpu`` slots for
25 ms on average (traced): the new first block waited for them. A look costs about 10 us."""


class Stopped(Exception):
    """The stream must end (superseded, server parking, iteration deleted, client gone)."""


class Superseded(Stopped):
    """The catalog has another stream in this one's place.

    A newer stream of its loop, a resumed job taking the rank over, or this server taken
    for dead after an outage put it there. Its loop, if still there, reconnects: a newer
    stream of its own session takes over.
    """


class CatalogLost(Exception):
    """The catalog failed under the stream (down too long, or a commit of unknown outcome).

    The client reconnects, and its new stream takes over what this one held.
    """


class StreamWork:
    """The ``Work`` a batcher does for one stream: claims within the budget."""

    def __init__(
        self,
        live: LiveIteration,
        handle: StreamHandle,
        world: World,
        flow: RankFlow,
        windowed: bool,
        cancelled: Callable[[], bool],
    ) -> None:
        self.live = live
        self.handle = handle
        self.world = world
        self.flow = flow
        self.windowed = windowed
        self._cancelled = cancelled
        self._checked = (0.0, False)

    def cancelled(self) -> bool:
        """Whether the client went away (asked of gRPC at most every ``CHECK_SECONDS``)."""
        at, answer = self._checked
        now = time.monotonic()
        if not answer and now - at >= CHECK_SECONDS:
            answer = self._cancelled()
            self._checked = (now, answer)
        return answer

    def check(self) -> None:
        """Raise ``Stopped`` (or ``IterationNotFound``) when the stream is to stop."""
        self._check()

    def _check(self) -> None:
        if self.live.deleted:  # the reader learns why its stream ends, in one line
            raise IterationNotFound(
                f"iteration {self.live.id} was deleted while this stream read it"
            )
        if self.live.parked or self.cancelled():
            log.debug(
                "stream of rank %d stops: parked=%s deleted=%s cancelled=%s",
                self.handle.rank,
                self.live.parked,
                self.live.deleted,
                self.cancelled(),
            )
            raise Stopped

    def room(self) -> int:
        """How many samples the stream may read ahead now (its share of the window)."""
        if not self.windowed:
            return UNBOUNDED
        with self.flow.cond:
            return max(self.flow.room(self.handle), self.flow.batch_size)

    def _wait_for_room(self) -> None:
        flow = self.flow
        with flow.cond:
            while True:
                self._check()
                if flow.stale:
                    self._refresh()
                    continue
                # claim when half the budget is free: fewer, larger claims
                if flow.room(self.handle) >= max(1, flow.share() // 2) or not flow.ahead(
                    self.handle
                ):
                    return
                self._wait(flow)

    def _wait(self, flow: RankFlow) -> None:
        """Wait for the flow to change (called with its lock held), at most ``WAIT_SECONDS``.

        Looks at whether to stop every ``CHECK_SECONDS``; re-reads the rank from the catalog
        when nothing came meanwhile.
        """
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            if flow.cond.wait(min(CHECK_SECONDS, max(0.0, deadline - time.monotonic()))):
                return
            self._check()
            if time.monotonic() >= deadline:
                self._refresh()
                return

    def _refresh(self) -> None:
        """Re-read the rank from the catalog (called with the flow's lock held)."""
        try:
            state = self.live.store.state(
                self.handle.iteration_id, self.handle.epoch, self.handle.rank
            )
        except StorageError as exc:
            raise CatalogLost(str(exc)) from exc
        if state is None:  # its row is gone: the iteration was deleted (through any server)
            log.debug("stream of rank %d: no state", self.handle.rank)
            self.live.deleted = True
            raise IterationNotFound(
                f"iteration {self.live.id} was deleted while this stream read it"
            )
        self.flow.learn(state)

    def claim(self, max_chunks: int) -> list[Unit]:
        """Claim up to ``max_chunks`` chunks of the rank (waiting for room when windowed)."""
        self._check()
        if self.windowed:
            self._wait_for_room()
            with self.flow.cond:
                room = self.flow.room(self.handle)
            max_chunks = max(1, min(max_chunks, -(-room // self.flow.batch_size)))
        while True:
            try:
                found = self.live.store.claim(
                    self.handle, self.world, max_chunks, self.live.views.version
                )
                break
            except IterationNotFound:
                self.live.deleted = True
                raise
            except StorageError as exc:
                raise CatalogLost(str(exc)) from exc
            except VersionChanged:  # weights or a deal changed: look before mapping
                self.live.refresh()
                if self.live.views.deal_number(self.handle.epoch) != self.handle.deal:
                    raise IterationConflict(
                        f"iteration {self.live.id} was resumed with world_size="
                        f"{self.live.views.world_now}: this stream belongs to the old world"
                    ) from None
        if found is None:
            log.debug("stream of rank %d superseded", self.handle.rank)
            raise Superseded
        with self.flow.cond:
            self.flow.claimed(self.handle, found.ranges)
        log.debug("stream of rank %d claimed %d chunks (asked %d)", self.handle.rank,
                  len(found.units), max_chunks)  # fmt: skip
        return found.units

    def drain(self) -> None:
        """Wait until the loop took everything this stream sent (windowed streams only).

        The stream then ends holding nothing ahead of the loop: what it sent stays its own
        while the loop works through it, instead of going back to the queue.
        """
        if not self.windowed:
            return
        flow = self.flow
        with flow.cond:
            while True:
                self._check()
                if flow.stale:
                    self._refresh()
                    continue
                if not flow.ahead(self.handle):
                    return
                self._wait(flow)

    def release(self, ranges: list[tuple[int, int]], filtered: int, failed: int) -> None:
        """Samples the stream dropped where no batch will span them: finished, and counted."""
        try:
            self.live.store.release(self.handle, ranges, filtered, failed)
        except StorageError as exc:
            raise CatalogLost(str(exc)) from exc
        with self.flow.cond:
            self.flow.released(self.handle, ranges)
