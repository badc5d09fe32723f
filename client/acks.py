"""Acknowledgements sent in bulk from a background thread, off the training loop's path."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from ..protocol import iterations
from ..protocol.errors import LavenderError
from ..protocol.ranges import RangeSet
from .connection import LavenderClient

__all__ = ["Acknowledger", "acknowledging"]

log = logging.getLogger(__name__)


class Acknowledger:
    """Collects consumed batches' sequence ranges and sends them every ``interval`` seconds.

    The server saves an acknowledgement before answering it, so what was sent is never
    delivered again; what was not sent yet when the process dies is delivered again.
    """

    def __init__(
        self, client: LavenderClient, iteration_id: str, rank: int, interval: float = 0.25
    ) -> None:
        self.client = client
        self.iteration_id = iteration_id
        self.rank = rank
        self.interval = interval
        self._pending = RangeSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lavender-acks", daemon=True)
        self._thread.start()

    def add(self, ranges: list[tuple[int, int]] | list[list[int]]) -> None:
        """Queue the ranges of one consumed batch."""
        with self._lock:
            for start, stop in ranges:
                self._pending.add(start, stop)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except LavenderError as exc:  # kept for the next try; logged, never raised here
                log.warning("acknowledging %s failed, will retry: %s", self.iteration_id, exc)

    def flush(self) -> None:
        """Send what is queued now."""
        with self._lock:
            ranges = self._pending.ranges()
            self._pending = RangeSet()
        if not ranges:
            return
        try:
            body = iterations.AckBody(iteration_id=self.iteration_id, rank=self.rank, seq=ranges)
            self.client.action("ack", body)
        except BaseException:
            with self._lock:
                self._pending.update(ranges)
            raise

    def close(self) -> None:
        """Stop the thread and send what is left (a few tries)."""
        self._stop.set()
        self._thread.join(timeout=10)
        for attempt in range(3):
            try:
                self.flush()
                return
            except LavenderError as exc:
                if attempt == 2:
                    log.warning(
                        "could not acknowledge the last batches of %s (they will be delivered "
                        "again on resume): %s",
                        self.iteration_id,
                        exc,
                    )


T = TypeVar("T")


def acknowledging(items: Iterable[tuple[T, Any]], acks: Acknowledger) -> Iterator[T]:
    """Yield the batches of ``(batch, seq ranges)`` items, acknowledging as the loop goes.

    A batch is completed (its ranges queued for ``acks``) when the next one is asked for or
    the loop ends.
    """
    consumed = None
    try:
        for batch, seq in items:
            if consumed is not None:
                acks.add(consumed)
            consumed = seq
            yield batch
    finally:
        if consumed is not None:
            acks.add(consumed)
        acks.close()
