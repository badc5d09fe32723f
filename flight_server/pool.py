"""Worker processes that collate and preprocess batches, so remote preprocessing uses every core.

One bad plugin never stalls or kills the rest: each worker is a process of its own, started
with ``spawn`` (the server hosts gRPC, which does not survive ``fork``), served by one
thread of the pool over one pipe and holding one batch at a time. A worker that dies
(a crash in native code, ``os.abort()``, the OOM killer) or runs one plugin call past the
time limit (it is killed: a thread could not be) is replaced, and only the batch it held
fails, by the iteration's policy: with ``skip_on_failure`` its samples are skipped and
counted as failed, else the loop gets ``TransformFailed`` naming the plugin. Batches travel
as Arrow IPC bytes: a slice of a large table sends only its rows, where pickle sends the
whole table under it.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import multiprocessing
import queue
import signal
import threading
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import numpy as np
import pyarrow as pa

from ..protocol.errors import TransformFailed
from ..transforms import DEFAULT_PLUGIN_TIMEOUT, Outcome
from ..transforms import worker as transform_worker
from ..transforms.worker import LABEL_BYTES, Marks, read_batch, write_batch

__all__ = ["START_SECONDS", "TransformPool", "WorkResult"]

log = logging.getLogger(__name__)

START_SECONDS = 120.0
"""How long a worker process may take to start (import pyarrow, load the modules folder)."""
STOPPING = "the preprocessing workers stopped: the server is stopping"


@dataclass(frozen=True)
class WorkResult:
    """What became of one batch sent to a worker.

    ``result`` is the processed batch (None when every row failed) or, for a filter
    request, the keep mask; ``failed`` the failed rows (indices, or a mask for a filter
    request); ``error`` the ``TransformFailed`` line the worker raised; ``seconds`` the
    time the plugins took in the worker (not counting the trip).
    """

    result: Any
    failed: np.ndarray
    error: str | None
    seconds: float


@dataclass
class _Task:
    op: str
    spec: str
    batch: pa.RecordBatch
    future: Future[WorkResult]


class _Lost(Exception):
    """The worker holding a batch died or was killed; ``fatal``: it could not even start."""

    def __init__(self, why: str, fatal: bool = False) -> None:
        super().__init__(why)
        self.fatal = fatal


def _exit(code: int | None) -> str:
    """How a process ended, in words."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@functools.lru_cache(maxsize=64)
def _policy(spec: str) -> tuple[bool, str]:
    """``(skip_on_failure, uid_column)`` of a pipeline spec."""
    found = json.loads(spec)
    return bool(found.get("skip_on_failure")), str(found.get("uid_column") or "uid")


def _describe(batch: pa.RecordBatch, uid_column: str) -> str:
    if not batch.num_rows:
        return "an empty batch"
    first = batch.column(uid_column)[0].as_py() if uid_column in batch.schema.names else 0
    return f"a batch of {batch.num_rows} samples from {uid_column}={first!r}"


class _Worker:
    """One worker process: its pipe and the memory where it marks the plugin it runs."""

    def __init__(self, context: Any, modules_dir: str | None) -> None:
        self.conn, child = context.Pipe()
        clock = context.RawArray(ctypes.c_double, 1)
        label = context.RawArray(ctypes.c_char, LABEL_BYTES)
        self.marks = Marks(clock, label)
        self.process = context.Process(
            target=transform_worker.main,
            args=(child, modules_dir, clock, label),
            name="lavender-preprocess",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.pid: int | None = self.process.pid
        self._lock = threading.Lock()
        self._ended = False

    def wait_ready(self, seconds: float) -> None:
        """Until the worker has loaded its plugins.

        Raises:
            _Lost: it died or did not start in time (fatal: no batch is to blame).
        """
        ready = wait([self.conn, self.process.sentinel], timeout=seconds)
        if self.conn in ready:
            try:
                self.conn.recv()
                return
            except (EOFError, OSError):
                pass
        if not ready:
            raise _Lost(f"a preprocessing worker process did not start within {seconds:g} s", True)
        self.process.join(1)
        raise _Lost(
            f"a preprocessing worker process could not start ({_exit(self.process.exitcode)}); "
            "the server log shows why",
            True,
        )

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.is_alive()

    def stop(self) -> None:
        """Kill the process, from any thread; its pool thread releases the rest."""
        if self.process.is_alive():
            self.process.kill()

    def kill(self) -> None:
        """End the process (at once) and release its pipe; once, from any thread."""
        with self._lock:  # the pool's close and the worker's thread may both get here
            if self._ended:
                return
            self._ended = True
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)
            self.conn.close()


class TransformPool:
    """A pool of ``workers`` processes; each loads the same plugins as the server.

    Started on first use. ``submit`` a batch with the JSON spec of its pipeline
    (``transforms.pipeline.pipeline_spec``); ``outcome`` of the future is the ``Outcome``
    or raises ``TransformFailed``, as ``Pipeline.process`` would have; ``timed`` also says
    how long the plugins took in the worker, to decide whether the pool is worth it.

    Args:
        workers: processes to run.
        modules_dir: the server's modules folder (each worker loads it).
        min_row_seconds: work per row below which a batch is cheaper to process than to
            send to a worker (for the caller to compare with ``timed``).
        timeout: seconds one plugin call on one batch may take before its worker is killed
            (the server's ``--plugin-timeout``).
    """

    def __init__(
        self,
        workers: int,
        modules_dir: str | None,
        min_row_seconds: float = 20e-6,
        timeout: float = DEFAULT_PLUGIN_TIMEOUT,
    ) -> None:
        self.workers = workers
        self.min_row_seconds = min_row_seconds
        """Work per row below which a batch is cheaper to process than to send to a worker."""
        self.modules_dir = modules_dir
        self.timeout = timeout
        """Seconds one plugin call may take in a worker before the worker is killed."""
        self.start_seconds = START_SECONDS
        self.replaced = 0
        """Worker processes replaced so far (died, or killed past the time limit)."""
        self.answered = 0
        """Batches the workers answered so far."""
        self._context = multiprocessing.get_context("spawn")
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._live: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def started(self) -> bool:
        """Whether the worker processes were started (on the first batch)."""
        return bool(self._threads)

    def pids(self) -> list[int]:
        """Process ids of the workers running now."""
        with self._lock:
            return sorted(w.pid for w in self._live if w.pid is not None and w.alive())

    def _start_threads(self) -> None:
        with self._lock:
            if self._threads or self._closed:
                return
            for number in range(self.workers):
                thread = threading.Thread(
                    target=self._serve, name=f"lavender-pool-{number}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        log.info("started %d preprocessing workers", self.workers)

    # -- asking ----------------------------------------------------------------------

    def submit(self, spec: str, batch: pa.RecordBatch) -> Future[WorkResult]:
        """Queue one batch to collate and preprocess; ``outcome`` reads the future."""
        return self._submit("process", spec, batch)

    def submit_filter(self, spec: str, batch: pa.RecordBatch) -> Future[WorkResult]:
        """Queue one batch to filter; ``masks`` reads the future."""
        return self._submit("filter", spec, batch)

    def submit_categorize(self, spec: str, batch: pa.RecordBatch) -> Future[WorkResult]:
        """Queue one batch to categorize; ``masks`` reads the future (categories, failed)."""
        return self._submit("categorize", spec, batch)

    def _submit(self, op: str, spec: str, batch: pa.RecordBatch) -> Future[WorkResult]:
        future: Future[WorkResult] = Future()
        if self._closed:
            future.set_exception(TransformFailed(STOPPING))
            return future
        self._start_threads()
        self._tasks.put(_Task(op, spec, batch, future))
        return future

    def outcome(self, future: Future[WorkResult]) -> Outcome:
        """The result of a submitted batch.

        Raises:
            TransformFailed: the pipeline failed by its policy, its worker died or ran past
                the time limit (without ``skip_on_failure``), or the pool stopped.
        """
        done = self._done(future)
        return Outcome(done.result, done.failed)

    def masks(self, future: Future[WorkResult]) -> tuple[np.ndarray, np.ndarray]:
        """``(keep, failed)`` masks of a batch sent with ``submit_filter``.

        Raises:
            TransformFailed: as ``outcome``.
        """
        done = self._done(future)
        return done.result, done.failed

    def timed(self, spec: str, batch: pa.RecordBatch) -> tuple[Outcome, float]:
        """Process one batch in a worker: its outcome and the seconds the plugins took there.

        Raises:
            TransformFailed: as ``outcome``.
        """
        future = self.submit(spec, batch)
        outcome = self.outcome(future)
        return outcome, future.result().seconds

    @staticmethod
    def _done(future: Future[WorkResult]) -> WorkResult:
        try:
            done = future.result()
        except CancelledError:
            raise TransformFailed(STOPPING) from None
        if done.error is not None:
            raise TransformFailed(done.error)
        return done

    def close(self) -> None:
        """Stop the workers; batches not done fail with ``TransformFailed``."""
        with self._lock:
            self._closed = True
            threads, workers = list(self._threads), list(self._live)
        for _ in threads:
            self._tasks.put(None)
        for worker in workers:  # their threads see them die, fail their batches, tidy up
            worker.stop()
        for thread in threads:
            thread.join(5)
        with self._lock:
            leftovers = list(self._live)
        for worker in leftovers:
            worker.kill()

    # -- serving (one thread per worker) -----------------------------------------------

    def _serve(self) -> None:
        worker: _Worker | None = None
        try:
            worker = self._start()
        except _Lost as exc:
            if not self._closed:
                log.error("%s", exc)
        while True:
            task: _Task | None = self._tasks.get()
            if task is None:
                break
            if self._closed:
                task.future.set_exception(TransformFailed(STOPPING))
                continue
            if not task.future.set_running_or_notify_cancel():
                continue
            try:
                if worker is not None and not worker.alive():  # died while idle
                    log.warning("preprocessing worker %s died (%s) while idle; replacing it",
                                worker.pid, _exit(worker.process.exitcode))  # fmt: skip
                    self._forget(worker, replaced=True)
                    worker = None
                if worker is None:
                    worker = self._start()
                done = self._run(worker, task)
                with self._lock:
                    self.answered += 1
                task.future.set_result(done)
            except _Lost as lost:
                # the worker is counted as replaced before its batch fails: whoever hears
                # of the failure sees the pool as it is
                if worker is not None:
                    self._forget(worker, replaced=not lost.fatal)
                    worker = None
                self._fail(task, lost)
                if not self._closed and not lost.fatal:
                    try:  # the next batch need not wait for a new process to start
                        worker = self._start()
                    except _Lost as exc:
                        if not self._closed:
                            log.error("%s", exc)
            except BaseException as exc:  # a bug of ours: the loop hears of it
                task.future.set_exception(exc)
                if worker is not None:  # its pipe may be mid-message: start afresh
                    self._forget(worker, replaced=False)
                    worker = None
        if worker is not None:
            self._forget(worker, replaced=False)

    def _start(self) -> _Worker:
        try:
            worker = _Worker(self._context, self.modules_dir)
        except Exception as exc:  # no process at all (out of memory, file descriptors...)
            raise _Lost(
                f"a preprocessing worker process could not start: {type(exc).__name__}: {exc}",
                True,
            ) from exc
        with self._lock:
            self._live.add(worker)
        try:
            worker.wait_ready(self.start_seconds)
        except _Lost:
            self._forget(worker, replaced=False)
            raise
        return worker

    def _forget(self, worker: _Worker, replaced: bool) -> None:
        worker.kill()
        with self._lock:
            self._live.discard(worker)
            if replaced:
                self.replaced += 1

    def _run(self, worker: _Worker, task: _Task) -> WorkResult:
        """Send a batch to the worker and wait for its answer, watching the time limit.

        Raises:
            _Lost: the worker died, or a plugin call (or the worker outside of one) ran
                past the time limit and the worker was killed.
        """
        _, uid_column = _policy(task.spec)
        data = write_batch(task.batch)
        try:
            worker.conn.send((task.op, task.spec))
            worker.conn.send_bytes(data)
        except OSError:
            raise self._died(worker, task, uid_column) from None
        tick = max(0.01, min(0.25, self.timeout / 4))
        while True:
            ready = wait([worker.conn, worker.process.sentinel], timeout=tick)
            if worker.conn in ready:
                try:
                    return self._answer(worker, task)
                except (EOFError, OSError):
                    raise self._died(worker, task, uid_column) from None
            if ready:
                raise self._died(worker, task, uid_column)
            running = worker.marks.running()
            if running is not None and running[1] > self.timeout:
                worker.kill()
                # between plugin calls: our own work, or a plugin's __init__ (not marked)
                what = running[0] or "the preprocessing worker process (between plugin calls)"
                raise _Lost(
                    f"{what} did not finish {_describe(task.batch, uid_column)} within the "
                    f"plugin time limit of {self.timeout:g} s (--plugin-timeout); its worker "
                    "process was killed and a new one takes its place"
                )

    def _answer(self, worker: _Worker, task: _Task) -> WorkResult:
        answer = worker.conn.recv()
        if answer[0] == "error":
            return WorkResult(None, np.zeros(0, dtype=np.int64), answer[1], answer[2])
        if answer[0] == "filtered":
            return WorkResult(answer[1], answer[2], None, answer[3])
        _, failed, seconds, has_result = answer
        result = read_batch(worker.conn.recv_bytes()) if has_result else None
        return WorkResult(result, failed, None, seconds)

    def _died(self, worker: _Worker, task: _Task, uid_column: str) -> _Lost:
        worker.process.join(1)
        running = worker.marks.running()  # else it died between calls: name the last one
        where = (running[0] if running else None) or worker.marks.last() or "a preprocessing step"
        return _Lost(
            f"{where}: the preprocessing worker process died ({_exit(worker.process.exitcode)}) "
            f"on {_describe(task.batch, uid_column)}; a new worker process takes its place"
        )

    def _fail(self, task: _Task, lost: _Lost) -> None:
        """The batch of a lost worker, by its pipeline's policy."""
        skip, _ = _policy(task.spec)
        if self._closed:
            task.future.set_exception(TransformFailed(STOPPING))
        elif lost.fatal:
            task.future.set_exception(TransformFailed(str(lost)))
        elif not skip:
            log.error("%s", lost)
            task.future.set_exception(
                TransformFailed(f"{lost}; skip_on_failure=True skips such batches")
            )
        else:
            rows = task.batch.num_rows
            log.warning("skipping %d samples: %s", rows, lost)
            if task.op == "filter":
                nothing = WorkResult(np.zeros(rows, bool), np.ones(rows, bool), None, 0.0)
            elif task.op == "categorize":
                nothing = WorkResult(pa.nulls(rows, pa.int64()), np.ones(rows, bool), None, 0.0)
            else:
                nothing = WorkResult(None, np.arange(rows, dtype=np.int64), None, 0.0)
            task.future.set_result(nothing)
