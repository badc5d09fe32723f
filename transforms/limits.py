"""Plugin calls with a time limit in the server process: the caller stops waiting.

A thread cannot be killed, so a call that runs past its limit is abandoned: it goes on on
a helper thread (and returns that thread to the helpers if it ever ends) while the caller
reports the failure and carries on. The limit only holds if the plugin lets go of the GIL
now and then (Python code does; a C loop holding the GIL stalls every thread): plugins that
can hang belong in worker processes (``--workers``), where a stuck call is killed.

Handing a call to a helper thread costs about 40 us, so built-in plugins (bounded by their
input) run on the caller's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

__all__ = ["DEFAULT_PLUGIN_TIMEOUT", "CallTimedOut", "abandoned_calls", "run_with_limit"]

log = logging.getLogger(__name__)

R = TypeVar("R")

DEFAULT_PLUGIN_TIMEOUT = 60.0
"""Seconds one plugin call on one batch may take unless the server says otherwise."""

IDLE_SECONDS = 30.0
"""A helper thread with nothing to do for this long ends."""


class CallTimedOut(Exception):
    """A call ran past its time limit; it was abandoned (it may still be running)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"took longer than {seconds:g} s")
        self.seconds = seconds


class _Helpers:
    """Daemon threads that run calls handed to them; more start when all are busy."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a task and not yet promised to one
        self._abandoned: set[Future[Any]] = set()

    def submit(self, call: Callable[[], R]) -> Future[R]:
        future: Future[R] = Future()
        with self._lock:
            if self._idle == 0:
                self._idle += 1
                threading.Thread(target=self._serve, name="lavender-plugin", daemon=True).start()
            self._idle -= 1  # this task's thread: no other task and no idle exit takes it
        self._tasks.put((call, future))
        return future

    def abandon(self, future: Future[Any]) -> int:
        with self._lock:
            if not future.done():
                self._abandoned.add(future)
            return len(self._abandoned)

    def abandoned(self) -> int:
        with self._lock:
            return len(self._abandoned)

    def _serve(self) -> None:
        while True:
            try:
                call, future = self._tasks.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # no task is promised this thread: end it
                        self._idle -= 1
                        return
                continue
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)
            with self._lock:
                if future in self._abandoned:
                    self._abandoned.discard(future)
                    log.warning("a plugin call abandoned after its time limit has ended")
                self._idle += 1


_helpers = _Helpers()


def run_with_limit(call: Callable[[], R], seconds: float | None) -> R:
    """``call()`` on a helper thread, waiting at most ``seconds`` (None: on this thread).

    Raises:
        CallTimedOut: the call did not end in time; it was abandoned, still running.
        BaseException: whatever the call raised.
    """
    if seconds is None:
        return call()
    future = _helpers.submit(call)
    try:
        return future.result(timeout=seconds)
    except FutureTimeout:
        if future.done():  # ended just now
            return future.result()
        stuck = _helpers.abandon(future)
        log.warning(
            "a plugin call took longer than %g s and was abandoned; %d abandoned call(s) "
            "still running in the server process",
            seconds,
            stuck,
        )
        raise CallTimedOut(seconds) from None


def abandoned_calls() -> int:
    """How many calls abandoned after their time limit are still running."""
    return _helpers.abandoned()
