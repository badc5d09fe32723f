"""What a preprocessing worker process runs: its own plugins, pipelines rebuilt from JSON.

The server's pool (``flight_server/pool.py``) starts it with ``spawn`` and talks to it over
one pipe: a request is a header ``(op, spec)`` then the batch as Arrow IPC bytes; an answer
is a header, then the result as Arrow IPC bytes when there is one. Before each plugin call
the worker writes the plugin's label and the time into memory it shares with the pool, so
the pool can tell which plugin overran its time limit (and kill this process) or which one
was running when the process died.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import time
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pyarrow as pa

from ..protocol.errors import LavenderError
from .pipeline import Pipeline, Step, from_spec
from .registry import Plugins

__all__ = ["LABEL_BYTES", "PIPELINES_KEPT", "Marks", "main", "read_batch", "write_batch"]

LABEL_BYTES = 200
"""Room for ``preprocessor 'name'`` in the shared memory."""
PIPELINES_KEPT = 32
"""Pipelines a worker keeps built (one per iteration spec it saw lately)."""


class Marks:
    """The shared memory of one worker: what it does since when, and the plugin it runs.

    Args:
        clock: one ``c_double``: ``time.monotonic()`` when the plugin call under way started
            (positive), or when the worker began its work outside plugin calls (negative),
            or 0 when it waits for a batch (``monotonic`` is one clock for every process).
        label: ``LABEL_BYTES`` chars, the label of the plugin that runs or ran last.
    """

    def __init__(self, clock: Any, label: Any) -> None:
        self.clock = clock
        self.label = label

    def mark(self, step: Step | None) -> None:
        """Say that ``step`` starts now (or, with None, that the worker is between calls)."""
        if step is None:
            self.clock[0] = -time.monotonic()
            return
        text = step.label.encode()[: LABEL_BYTES - 1] + b"\0"
        ctypes.memmove(self.label, text, len(text))
        self.clock[0] = time.monotonic()

    def idle(self) -> None:
        """Say that the worker waits for a batch."""
        self.clock[0] = 0.0

    def running(self) -> tuple[str | None, float] | None:
        """``(label of the plugin, or None between calls, seconds so far)``; None when idle."""
        started = float(self.clock[0])
        if not started:
            return None
        if started < 0:
            return None, time.monotonic() + started
        return self.last(), time.monotonic() - started

    def last(self) -> str:
        """The label of the plugin that ran last (or runs now)."""
        return str(self.label.value.decode(errors="replace"))


def write_batch(batch: pa.RecordBatch) -> pa.Buffer:
    """A batch as Arrow IPC stream bytes (a slice sends only its own rows, unlike pickle)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def read_batch(data: bytes | pa.Buffer) -> pa.RecordBatch:
    """The batch ``write_batch`` wrote (no copy of ``data``)."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_next_batch()


def main(conn: Connection, modules_dir: str | None, clock: Any, label: Any) -> None:
    """Serve requests on ``conn`` until it closes or a None request comes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops its workers itself
    # the server reported the modules that failed to load; workers need not say it again
    logging.getLogger("lavender_flight").addHandler(logging.NullHandler())
    plugins = Plugins.load(modules_dir, timeout=None)  # the pool watches the time
    marks = Marks(clock, label)
    pipelines: OrderedDict[str, Pipeline] = OrderedDict()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
            if request is None:
                return
            op, spec = request
            marks.mark(None)  # busy from here: the pool's time limit holds outside calls too
            batch = read_batch(conn.recv_bytes())
        except (EOFError, OSError):  # the server went away
            return
        try:
            _serve_one(conn, plugins, pipelines, marks, op, spec, batch)
        finally:
            marks.idle()


def _serve_one(
    conn: Connection,
    plugins: Plugins,
    pipelines: OrderedDict[str, Pipeline],
    marks: Marks,
    op: str,
    spec: str,
    batch: pa.RecordBatch,
) -> None:
    """Answer one request (a header, then the result's IPC bytes when there is one)."""
    started = time.perf_counter()
    try:
        pipeline = pipelines.get(spec)
        if pipeline is None:
            pipeline = from_spec(plugins, json.loads(spec))
            pipeline.watch = marks.mark
            pipelines[spec] = pipeline
            while len(pipelines) > PIPELINES_KEPT:
                pipelines.popitem(last=False)
            # the seconds answered are the plugins' on this batch: building the pipeline
            # happens once an iteration, and would make a small first batch look costly
            started = time.perf_counter()
        pipelines.move_to_end(spec)
        if op == "filter":
            keep, failed = pipeline.filter(batch)
            conn.send(("filtered", keep, failed, time.perf_counter() - started))
            return
        if op == "categorize":  # answered as a filter is: values and the failed mask
            categories, failed = pipeline.categorize(batch)
            conn.send(("filtered", categories, failed, time.perf_counter() - started))
            return
        outcome = pipeline.process(batch)
    except LavenderError as exc:  # TransformFailed, as the policy says; or a bad spec
        conn.send(("error", str(exc), time.perf_counter() - started))
        return
    except Exception as exc:  # a bug of ours: still one line for the loop
        conn.send(("error", f"{type(exc).__name__}: {exc}", time.perf_counter() - started))
        return
    seconds = time.perf_counter() - started
    result = outcome.result
    if result is None:
        conn.send(("done", np.asarray(outcome.failed), seconds, False))
        return
    try:
        data = write_batch(result)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        conn.send(("error", f"{marks.last()} returned a batch Arrow cannot send: {exc}", 0.0))
        return
    conn.send(("done", np.asarray(outcome.failed), seconds, True))
    conn.send_bytes(data)
