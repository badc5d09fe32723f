"""What a training loop reports: the batches it takes and completes, sent off its path.

A batch is *taken* when it is handed to the loop and *completed* when the loop asks for the
next one (or ends). A background thread sends both in bulk: taken reports soon (the
server keeps its read-ahead within a budget measured from them), completions every
``interval`` seconds. The server saves completions before it answers, so what was sent is
never delivered again; what was not sent when the process dies is delivered again.

When reports cannot be sent (the server is gone), the loop is let run on for a bounded
number of batches, then waits for the server (retrying) for up to ``reconnect_seconds``,
and raises ``ServerUnavailable`` saying how much was not recorded if it does not come back.
An iteration deleted meanwhile is no such case: the loop gets ``IterationNotFound`` at once.

Reports go to the server that streams the rank (it keeps the loop's read-ahead window;
``follow`` moves them when the stream moves); when that one cannot be reached, to the other
servers of the rank's endpoint in turn (any server records them: the state is in the
catalog).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from ..protocol.errors import IterationNotFound, LavenderError, ServerUnavailable
from ..protocol.iterations import AckBody
from ..protocol.ranges import RangeSet
from .connection import LavenderClient

__all__ = ["Acknowledger", "Ranges", "acknowledging", "acknowledging_samples"]

log = logging.getLogger(__name__)

Ranges = list[tuple[int, int]] | list[list[int]]

MAX_UNSENT_BATCHES = 16
"""Completed batches the loop may run ahead of reports that cannot be sent."""


def _size(ranges: RangeSet) -> int:
    return len(ranges)


class Acknowledger:
    """Sends a rank's taken and completed batches from a background thread (see module doc).

    Args:
        client: the connection reports go to (the server streaming the rank).
        iteration_id, rank, epoch: whose batches.
        interval: seconds between sends of completions.
        reconnect_seconds: how long the loop waits for an unreachable server.
        fallbacks: connections to the other servers of the rank, tried in turn when
            ``client``'s server cannot be reached.
    """

    def __init__(
        self,
        client: LavenderClient,
        iteration_id: str,
        rank: int,
        epoch: int,
        interval: float = 0.25,
        reconnect_seconds: float = 30.0,
        fallbacks: Sequence[LavenderClient] = (),
    ) -> None:
        self.deal: int | None = None
        """The deal the batches are of (the batch metadata says, after an elastic resume)."""
        self.client = client
        self.fallbacks = [c for c in fallbacks if c is not client]
        self.iteration_id = iteration_id
        self.rank = rank
        self.epoch = epoch
        self.interval = interval
        self.reconnect_seconds = reconnect_seconds
        self.report_every = 1
        """Samples of taken batches after which a report goes at once (the server says)."""
        self._taken = RangeSet()
        self._taken_count = 0  # samples taken since the last report (the trigger's count)
        self._completed = RangeSet()
        self._unsent_batches = 0
        self._failing_since: float | None = None
        self._error: LavenderError | None = None
        self._gave_up = False
        self._gone: IterationNotFound | None = None
        """The iteration was deleted: nothing more is sent, the loop is told once."""
        self._told = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sent = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="lavender-acks", daemon=True)
        self._thread.start()

    # -- where reports go ----------------------------------------------------------------

    def follow(self, client: LavenderClient) -> None:
        """Send reports to ``client`` from now on (the stream moved to its server)."""
        with self._lock:
            if client is self.client:
                return
            self.fallbacks = [c for c in [self.client, *self.fallbacks] if c is not client]
            self.client = client

    def _send(self, body: AckBody) -> None:
        """Send one report: to ``client``; when unreachable, to the fallbacks in turn."""
        with self._lock:
            targets = [self.client, *self.fallbacks]
        last: ServerUnavailable | None = None
        for target in targets:
            try:
                target.action("ack", body)
            except ServerUnavailable as exc:
                last = exc
                continue
            if target is not targets[0]:
                self.follow(target)
            return
        assert last is not None
        raise last

    # -- what the loop says --------------------------------------------------------------

    def take(self, ranges: Ranges) -> None:
        """The loop was handed the batch of these ranges."""
        with self._lock:
            for start, stop in ranges:
                self._taken.add(start, stop)
                self._taken_count += stop - start
            due = self._taken_count >= self.report_every
        if due:
            self._wake.set()

    def complete(self, ranges: Ranges) -> None:
        """The loop is done with the batch of these ranges.

        Waits (retrying) when reports have been failing for ``MAX_UNSENT_BATCHES`` batches.
        Raises ``IterationNotFound`` (once) when the iteration was deleted.
        """
        with self._lock:
            if self._gone is not None:
                if self._told:
                    return
                self._told = True
                raise self._gone
            for start, stop in ranges:
                self._completed.add(start, stop)
            self._unsent_batches += 1
            stuck = self._failing_since is not None and self._unsent_batches > MAX_UNSENT_BATCHES
        if stuck:
            self._wait_for_server()

    def _wait_for_server(self) -> None:
        with self._lock:
            since = self._failing_since or time.monotonic()
            while self._failing_since is not None and self._gone is None:
                left = since + self.reconnect_seconds - time.monotonic()
                if left <= 0:
                    self._gave_up = True
                    raise self.unrecorded()
                self._wake.set()
                self._sent.wait(min(left, 1.0))
            if self._gone is not None and not self._told:
                self._told = True
                raise self._gone

    def unsent(self) -> int:
        """Completed samples not recorded by the server yet."""
        with self._lock:
            return _size(self._completed)

    def unrecorded(self) -> ServerUnavailable:
        """The error that says what could not be recorded (call with the lock held)."""
        count = _size(self._completed)
        reason = f": {self._error}" if self._error is not None else ""
        return ServerUnavailable(
            f"the server did not come back within {self.reconnect_seconds:g} s; "
            f"{count} completed sample(s) of iteration {self.iteration_id} rank {self.rank} "
            f"were not recorded (they will be delivered again on resume){reason}"
        )

    # -- sending -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.flush()
            except LavenderError:
                pass  # kept for the next try; flush said it once

    def flush(self) -> None:
        """Send what is queued now (nothing is lost when it fails: it is kept for later)."""
        with self._lock:
            taken, completed = self._taken.ranges(), self._completed.ranges()
            self._taken, self._completed = RangeSet(), RangeSet()
            self._taken_count = 0
            batches, self._unsent_batches = self._unsent_batches, 0
            gone = self._gone is not None
        if gone or (not taken and not completed):
            return
        body = AckBody(
            iteration_id=self.iteration_id,
            rank=self.rank,
            epoch=self.epoch,
            deal=self.deal,
            taken=taken,
            completed=completed,
        )
        try:
            self._send(body)
        except IterationNotFound as exc:  # deleted: final, there is nothing to retry
            with self._lock:
                self._gone = exc
                self._sent.notify_all()
            raise
        except BaseException as exc:
            with self._lock:
                self._taken.update(taken)
                self._taken_count += sum(b - a for a, b in taken)
                self._completed.update(completed)
                self._unsent_batches += batches
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning(
                        "cannot report progress of %s to the server (%s); retrying for up to "
                        "%g s", self.iteration_id, exc, self.reconnect_seconds,
                    )  # fmt: skip
                if isinstance(exc, LavenderError):
                    self._error = exc
            raise
        with self._lock:
            if self._failing_since is not None:
                log.warning("reporting progress of %s works again", self.iteration_id)
            self._failing_since = None
            self._error = None
            self._sent.notify_all()

    def close(self, wait: bool = True) -> None:
        """Stop the thread and send what is left.

        Retries for up to ``reconnect_seconds`` and raises ``ServerUnavailable`` when the
        server does not come back; with ``wait=False`` (a loop left early) it tries once and
        only warns: what was not recorded is delivered again on resume.
        """
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        patient = wait and not self._gave_up
        deadline = time.monotonic() + (self.reconnect_seconds if patient else 0)
        delay = 0.2
        while True:
            try:
                self.flush()
                return
            except IterationNotFound:
                return  # deleted: the loop was told (or is being told) by its stream
            except LavenderError as exc:
                if time.monotonic() + delay > deadline:
                    with self._lock:
                        error = self.unrecorded()
                    log.warning("%s", error)
                    if patient:
                        raise error from exc
                    return
                time.sleep(delay)
                delay = min(2.0, delay * 2)


T = TypeVar("T")


def acknowledging(items: Iterable[tuple[T, Any]], acks: Acknowledger) -> Iterator[T]:
    """Yield the batches of ``(batch, seq ranges)`` items, reporting as the loop goes.

    A batch is taken when it is yielded and completed when the next one is asked for or
    the loop ends. A batch this loop was already handed (sent again after a reconnect) is
    completed again but not yielded twice. A loop that runs to its end waits for the last
    reports to be recorded (raising ``ServerUnavailable`` if they cannot be); one left
    early only warns.
    """
    seen = RangeSet()
    top = 0  # every seq the loop was handed is below this
    consumed = None
    ended = False
    try:
        for batch, seq in items:
            if seq and seq[0][0] < top and all(not seen.gaps(a, b) for a, b in seq):
                # a repeat after a reconnect: the loop had it already; the stream that sent
                # it again counts it as read ahead until it hears the loop has it
                acks.take(seq)
                continue
            if consumed is not None:
                acks.complete(consumed)
            for a, b in seq:
                seen.add(a, b)
                top = max(top, b)
            acks.take(seq)
            consumed = seq
            yield batch
        ended = True
    except ServerUnavailable as exc:  # the server stayed away: say what was not recorded
        if consumed is not None:
            acks.complete(consumed)
            consumed = None
        lost = acks.unsent()
        if lost:
            raise ServerUnavailable(
                f"{exc}; {lost} completed sample(s) were not recorded: they will be "
                "delivered again on resume"
            ) from None
        raise
    finally:
        if consumed is not None:
            acks.complete(consumed)
        acks.close(wait=ended)  # a loop left early (break, an error) only warns


def acknowledging_samples(
    items: Iterable[tuple[Any, Any]], acks: Acknowledger, explode: Callable[[Any], Iterable[T]]
) -> Iterator[T]:
    """Yield the samples of ``(group, seq ranges)`` items one at a time (``batch_size=0``).

    A group is taken when its first sample is yielded and completed when the sample after
    its last is asked for (or the loop ends, or leaves right after its last sample). A loop
    that leaves in the middle of a group leaves that group not completed: it comes again
    on resume, whole (the samples of a group are acknowledged together).
    """
    seen = RangeSet()
    pending: Any = None
    holding: Any = None
    ended = False
    try:
        for group, seq in items:
            if seq and all(not seen.gaps(a, b) for a, b in seq):
                acks.take(seq)  # a repeat after a reconnect (see acknowledging)
                continue
            for a, b in seq:
                seen.add(a, b)
            acks.take(seq)
            rows = list(explode(group))
            for index, sample in enumerate(rows):
                if pending is not None:
                    acks.complete(pending)
                    pending = None
                holding = seq if index == len(rows) - 1 else None
                yield sample
                holding = None
            if pending is not None:  # a group with no sample left (all filtered)
                acks.complete(pending)
            pending = seq
        ended = True
    finally:
        for done in (pending, holding):
            if done is not None:
                acks.complete(done)
        acks.close(wait=ended)
