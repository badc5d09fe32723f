"""The read pool: reads from storage side by side, kept apart by store.

Every shard file the server reads for a stream, and every block it assembles, runs on one
pool of threads that grows with demand (up to ``max_threads``) and shrinks when idle. Each
task belongs to a *lane*: the store it reads (``store_key``: ``file`` for this machine's
disks, else the protocol with the endpoint and bucket), or ``cpu`` for work on rows already
in memory (gathering a block into an epoch's order, filtering it). A lane runs at most its
limit of tasks at once (``threads`` for local disks and ``cpu``: decoding is CPU work;
``remote`` for an object store, where a read mostly waits on the network); the others wait
in the lane's queue without holding a thread, and lanes take turns. So a store that stops
answering holds only its own lane: every other store's reads, and the blocks waiting on
them, go on as before.

A task may be *urgent* (work a stream, or a new iteration's first batch, waits for): it
goes to the front of its lane's queue, and a task already queued for the same ``tag`` can
be made urgent later (``promote``). Long tasks give way to urgent ones between their steps
(``urgent_waiting``): a first batch does not queue behind other iterations' read-ahead.

Waits are bounded: ``run`` (a read on behalf of a task of another lane) gives up after
``timeout`` seconds with a ``StorageError`` naming the store, and so does a stream waiting
for a block (``BlockReader``).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..protocol.errors import StorageError
from .storage import Location

__all__ = ["CPU", "LOCAL", "ReadPool", "default_read_threads", "store_key", "wait_for"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CPU = "cpu"
"""The lane of work on rows already in memory."""
LOCAL = "file"
"""The lane of this machine's disks."""
DEFAULT_TIMEOUT = 120.0


def default_read_threads() -> int:
    """Reads of local files at once: one per core (at least 2)."""
    return max(2, os.cpu_count() or 1)


def store_key(location: Location) -> str:
    """The lane of a location: ``file`` for local disks, else protocol, endpoint and bucket.

    Locations of one store share a lane (a slow store is slow for all its folders); two
    buckets, or two endpoints, are two stores.
    """
    if location.is_local:
        return LOCAL
    fs = location.fs
    endpoint = getattr(fs, "endpoint_url", None)
    if not endpoint:
        client = getattr(fs, "client_kwargs", None) or {}
        endpoint = client.get("endpoint_url") if isinstance(client, dict) else None
    bucket = location.path.lstrip("/").split("/", 1)[0]
    return f"{location.protocol}://{endpoint or ''}/{bucket}"


@dataclass
class _Task:
    future: Future[Any]
    fn: Callable[[], Any]
    urgent: bool
    tag: object | None


@dataclass
class _Lane:
    limit: int
    queue: deque[_Task] = field(default_factory=deque)
    running: int = 0
    urgent: int = 0
    """Urgent tasks in the queue."""


class ReadPool:
    """Threads for reads and block work, in lanes (see the module docstring).

    Args:
        threads: tasks at once on local disks and on the ``cpu`` lane (default: the cores).
        remote: tasks at once per remote store (default: 4 per local thread).
        max_threads: the bound on threads, all lanes together.
        idle_seconds: a thread with nothing to do for this long ends.
        timeout: seconds ``run`` waits for a read of another lane.
    """

    def __init__(
        self,
        threads: int | None = None,
        remote: int | None = None,
        max_threads: int = 256,
        idle_seconds: float = 300.0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.threads = max(1, threads or default_read_threads())
        self.remote = max(1, remote or 4 * self.threads)
        self.max_threads = max(self.threads, max_threads)
        self.idle_seconds = idle_seconds
        self.timeout = timeout
        self._lanes: dict[str, _Lane] = {}
        self._order: deque[str] = deque()  # lanes with queued tasks, in turn
        self._cond = threading.Condition()
        self._workers = 0
        # idle threads, the most recently idle last: it is woken first, so that the same
        # few threads do the work (and their allocator caches stay warm)
        self._sleepers: list[threading.Event] = []
        self._closed = False
        self._names = itertools.count()
        self._local = threading.local()

    # -- lanes ---------------------------------------------------------------------------

    def limit(self, lane: str) -> int:
        """How many tasks of ``lane`` run at once."""
        return self.threads if lane in (CPU, LOCAL) or lane.startswith("memory") else self.remote

    @property
    def lane(self) -> str | None:
        """The lane of the task the calling thread runs (None outside the pool)."""
        return getattr(self._local, "lane", None)

    @property
    def busy(self) -> dict[str, int]:
        """Tasks running and queued per lane (for logs and tests)."""
        with self._cond:
            return {
                k: v.running + len(v.queue) for k, v in self._lanes.items() if v.running or v.queue
            }

    # -- tasks ---------------------------------------------------------------------------

    def submit(
        self,
        lane: str,
        fn: Callable[..., T],
        *args: Any,
        urgent: bool = False,
        tag: object | None = None,
    ) -> Future[T]:
        """Run ``fn(*args)`` on a thread of ``lane``; its future.

        ``urgent``: ahead of the lane's queued tasks that are not; ``tag``: what ``promote``
        knows the task by (held only while it is queued).
        """
        future: Future[T] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the read pool is closed")
            found = self._lanes.get(lane)
            if found is None:
                found = self._lanes[lane] = _Lane(self.limit(lane))
            if not found.queue:
                self._order.append(lane)
            task = _Task(future, (lambda: fn(*args)) if args else fn, urgent, tag)
            if urgent:
                found.queue.insert(found.urgent, task)  # behind the urgent ones before it
                found.urgent += 1
            else:
                found.queue.append(task)
            del task
            if found.running + len(found.queue) > found.limit:
                pass  # it waits for its lane: a thread finishing there takes it
            elif self._sleepers:
                self._sleepers.pop().set()
            elif self._workers < self.max_threads:
                self._workers += 1
                threading.Thread(
                    target=self._work, name=f"lavender-read-{next(self._names)}", daemon=True
                ).start()
        return future

    def promote(self, tag: object) -> None:
        """Make the queued tasks submitted with ``tag`` urgent (a stream waits for them now)."""
        with self._cond:
            for found in self._lanes.values():
                # the queue: its urgent tasks, then the others; the tag's move between them
                urgent: list[_Task] = []
                waiting: list[_Task] = []
                rest: list[_Task] = []
                for task in found.queue:
                    (urgent if task.urgent else waiting if task.tag is tag else rest).append(task)
                if not waiting:
                    continue
                for task in waiting:
                    task.urgent = True
                found.queue = deque([*urgent, *waiting, *rest])
                found.urgent += len(waiting)

    def urgent_waiting(self, lane: str) -> bool:
        """Whether urgent tasks wait in ``lane``'s queue (a long task may give way)."""
        with self._cond:
            found = self._lanes.get(lane)
            return found is not None and found.urgent > 0

    def run(
        self, lane: str, fn: Callable[[], T], what: str = "", timeout: float | None = None
    ) -> T:
        """``fn()`` on ``lane``, waited for (at once when the caller already runs on it).

        Raises:
            StorageError: it did not finish within ``timeout`` seconds (default: the pool's).
        """
        if self.lane == lane:
            return fn()
        future = self.submit(lane, fn)
        return wait_for(future, self.timeout if timeout is None else timeout, what or lane)

    def _next(self) -> tuple[str, Future[Any], Callable[[], Any]] | None:
        """The next task a lane with room may run (lanes in turn); lock held."""
        for _ in range(len(self._order)):
            lane = self._order[0]
            self._order.rotate(-1)
            found = self._lanes[lane]
            if found.running < found.limit and found.queue:
                task = found.queue.popleft()
                if task.urgent:
                    found.urgent -= 1
                found.running += 1
                if not found.queue:
                    self._order.remove(lane)
                return lane, task.future, task.fn
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                task = self._next()
                if task is None:
                    if self._closed:
                        self._workers -= 1
                        return
                    wake = threading.Event()
                    self._sleepers.append(wake)
            if task is None:
                woken = wake.wait(self.idle_seconds)
                with self._cond:
                    if not woken and wake in self._sleepers:  # idle for long: end
                        self._sleepers.remove(wake)
                        self._workers -= 1
                        return
                continue
            lane, future, fn = task
            self._local.lane = lane
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
            finally:
                # an idle thread must not keep its last task's rows alive
                del task, future, fn
                self._local.lane = None
                with self._cond:
                    self._lanes[lane].running -= 1
                    if self._lanes[lane].queue and lane not in self._order:
                        self._order.append(lane)

    def shutdown(self) -> None:
        """Run no more tasks (queued ones are cancelled); running ones finish on their own."""
        with self._cond:
            self._closed = True
            for found in self._lanes.values():
                while found.queue:
                    found.queue.popleft().future.cancel()
                found.urgent = 0
            self._order.clear()
            for wake in self._sleepers:
                wake.set()


def wait_for(
    future: Future[T],
    timeout: float,
    what: str,
    check: Callable[[], None] | None = None,
    every: float = 0.01,
) -> T:
    """A future's result, or ``StorageError`` after ``timeout`` seconds naming ``what``.

    ``check`` is called every ``every`` seconds of the wait; what it raises ends the wait.
    """
    deadline = time.monotonic() + timeout
    while check is not None and not future.done() and time.monotonic() < deadline:
        check()
        futures_wait([future], every)
    try:
        return future.result(max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        raise StorageError(
            f"{what} did not answer within {timeout:g} s (--read-timeout); the store may be "
            "down or overloaded: reads of other stores go on"
        ) from None
