"""Batches from DataLoader workers to the loop's process without pickling their rows.

torch pickles what a worker's collate function returns to send it to the loop's process:
every Python string of a text column, every Arrow buffer, one by one, and it pays its own
per-item costs (index and result queues, their feeder threads, a profiler scope) for each
item. Here a worker sends *groups*: each Flight message whole (its batches as the server
cut them), or a few batches its user's collate made (about ``GROUP_BYTES``), written once
into a POSIX shared-memory segment; only its name, layout and the batches' tokens (a
:class:`Group`) are pickled. The loop's process maps the segment (no copy) and rebuilds
the values over the shared pages:

- a message as the server sent it: its Arrow record batch, as Arrow IPC (every column
  type); the loop's process cuts it into batches in the loader's format as an iteration
  does (``formats.split``: numeric columns are tensors over the shared pages, strings
  Python strings), so it does no more per batch than a loop without workers;
- what a collate function of the user's returns: tensors and numpy arrays as their bytes,
  lists of strings as Arrow strings (offsets and bytes, rebuilt with no parsing), record
  batches as Arrow IPC, dicts, lists and tuples of those; anything else is pickled (small
  values).

A segment is unlinked as soon as the loop's process maps it (the mapping lives while a
batch uses it). A worker unlinks, when it exits, what it wrote and nobody mapped (a loop
left early); the loop's process, when it exits, what a killed worker left (segments are
named after it: ``/dev/shm/lf_<loop pid>_<worker pid>_...``). Not ``multiprocessing``'s
resource tracker: registering each segment there (a probe and a message per batch, and one
more to unregister it) cost 16 % of a 2-worker job's CPU.
"""

from __future__ import annotations

import atexit
import mmap
import os
import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import util
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .formats import split

__all__ = ["GROUP_BYTES", "Bundle", "Group", "Shipment", "Token", "sweep_at_exit", "unpack"]

ALIGN = 64
GROUP_BYTES = 4 << 20
"""A worker ships what its user's collate made once it holds this much (or the message ends)."""

_posixshmem: Any
try:  # CPython's own binding (what multiprocessing.shared_memory uses)
    import _posixshmem  # type: ignore[import-not-found, no-redef]
except ImportError:  # pragma: no cover - not POSIX
    _posixshmem = None


@dataclass
class Token:
    """What travels beside a batch: its sequence ranges, how often the loop reports, its deal."""

    seq: list[tuple[int, int]]
    report_every: int | None = None
    deal: int | None = None


@dataclass
class Group:
    """One item a worker sends: consecutive batches of its stream, their tokens, its id.

    ``sizes``: the rows of each batch when the shipment is a message as the server sent it
    (None: the shipment is a list of what the user's collate made, one value per batch).
    ``end``: the worker's stream ended (no batches): the loop stops waiting for its turn.
    """

    worker: int
    tokens: list[Token] = field(default_factory=list)
    sizes: list[int] | None = None
    end: bool = False


# -- segments --------------------------------------------------------------------------


class _Written:
    """The segments this worker wrote lately (unlinked at its exit if nobody mapped them)."""

    def __init__(self) -> None:
        self.names: deque[str] = deque(maxlen=1024)  # older ones were mapped long ago
        self.lock = threading.Lock()
        self.hooked = False

    def add(self, name: str) -> None:
        with self.lock:
            self.names.append(name)
            if not self.hooked:
                self.hooked = True
                util.Finalize(None, self.unlink_all, exitpriority=10)

    def unlink_all(self) -> None:
        with self.lock:
            names, self.names = list(self.names), deque(maxlen=1024)
        for name in names:
            try:
                _posixshmem.shm_unlink(name)
            except FileNotFoundError:
                continue  # mapped (and unlinked) by the loop's process


_written = _Written()
_swept = threading.Lock()
_sweeping = [False]


def sweep_at_exit() -> None:
    """In the loop's process: at its exit, unlink what its workers wrote and it never mapped."""
    with _swept:
        if _sweeping[0]:
            return
        _sweeping[0] = True
    atexit.register(_sweep, os.getpid())


def _sweep(pid: int) -> None:
    for path in Path("/dev/shm").glob(f"lf_{pid}_*"):
        try:
            _posixshmem.shm_unlink("/" + path.name)
        except OSError:
            continue


def _create(size: int) -> tuple[str, mmap.mmap]:
    """A new segment of ``size`` bytes, mapped for writing."""
    name = f"/lf_{os.getppid()}_{os.getpid()}_{secrets.token_hex(8)}"
    fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        os.ftruncate(fd, max(1, size))
        mapping = mmap.mmap(fd, max(1, size))
    finally:
        os.close(fd)
    _written.add(name)
    return name, mapping


def _attach(name: str, size: int) -> mmap.mmap:
    """Map a segment a worker wrote, and unlink it (the mapping keeps its pages)."""
    fd = _posixshmem.shm_open(name, os.O_RDONLY, mode=0o600)
    try:
        # private and writable: tensors over it need no copy, and never reach the worker
        mapping = mmap.mmap(fd, max(1, size), access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    _posixshmem.shm_unlink(name)
    return mapping


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


# -- what a batch becomes --------------------------------------------------------------


def _ipc_size(batch: pa.RecordBatch) -> int:
    sink = pa.MockOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return int(sink.size())


def _write_ipc(batch: pa.RecordBatch, target: memoryview) -> None:
    with pa.ipc.new_stream(pa.FixedSizeBufferWriter(pa.py_buffer(target)), batch.schema) as w:
        w.write_batch(batch)


def _write_raw(raw: Any, size: int, target: memoryview) -> None:
    target[:size] = raw


def _write_batch(batch: pa.RecordBatch, size: int, target: memoryview) -> None:
    _write_ipc(batch, target[:size])


def _read_ipc(view: memoryview) -> pa.RecordBatch:
    return pa.ipc.open_stream(pa.py_buffer(view)).read_next_batch()


class _Layout:
    """How a value lies in a segment: a spec (pickled, small) and the bytes to write."""

    def __init__(self) -> None:
        self.size = 0
        self.parts: list[tuple[int, Callable[[memoryview], None]]] = []

    def place(self, nbytes: int, write: Callable[[memoryview], None]) -> int:
        offset = self.size
        self.size += _aligned(nbytes)
        self.parts.append((offset, write))
        return offset

    def buffer(self, buf: pa.Buffer | None) -> tuple[int, int] | None:
        """Place an Arrow buffer's bytes: where they are and how many (None: no buffer)."""
        if buf is None:
            return None
        raw = np.frombuffer(buf, dtype=np.uint8)
        return self.place(buf.size, partial(_write_raw, raw, buf.size)), buf.size

    def spec(self, value: Any) -> Any:
        import torch

        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            tensor = value.detach().contiguous()
            raw = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
            size = tensor.numel() * tensor.element_size()
            at = self.place(size, partial(_write_raw, raw, size))
            return ("tensor", str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), at)
        if isinstance(value, np.ndarray) and value.dtype != object:
            array = np.ascontiguousarray(value)
            raw = array.reshape(-1).view(np.uint8)
            at = self.place(array.nbytes, partial(_write_raw, raw, array.nbytes))
            return ("ndarray", array.dtype.str, array.shape, at)
        if isinstance(value, pa.RecordBatch):
            size = _ipc_size(value)
            at = self.place(size, partial(_write_batch, value, size))
            return ("arrow", size, at)
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, str) or v is None for v in value)
        ):
            strings = pa.array(value, pa.large_string())
            return ("strings", len(strings), strings.null_count,
                    *(self.buffer(buf) for buf in strings.buffers()))  # fmt: skip
        if isinstance(value, dict):
            return ("dict", [(k, self.spec(v)) for k, v in value.items()])
        if isinstance(value, (list, tuple)):
            return ("list" if isinstance(value, list) else "tuple", [self.spec(v) for v in value])
        return ("value", value)


def _rebuild(spec: Any, view: memoryview) -> Any:
    kind = spec[0]
    if kind == "tensor":
        import torch

        _, dtype, shape, at = spec
        kind_of = getattr(torch, dtype)
        count = int(np.prod(shape)) if shape else 1
        if count == 0:
            return torch.empty(shape, dtype=kind_of)
        return torch.frombuffer(view, dtype=kind_of, count=count, offset=at).reshape(shape)
    if kind == "ndarray":
        _, dtype, shape, at = spec
        count = int(np.prod(shape)) if shape else 1
        return np.frombuffer(view, dtype=np.dtype(dtype), count=count, offset=at).reshape(shape)
    if kind == "arrow":
        return _read_ipc(view[spec[2] : spec[2] + spec[1]])
    if kind == "strings":
        _, count, nulls, *places = spec
        buffers = [None if p is None else pa.py_buffer(view[p[0] : p[0] + p[1]]) for p in places]
        strings = pa.Array.from_buffers(pa.large_string(), count, buffers, null_count=nulls)
        return strings.to_pylist()
    if kind == "dict":
        return {k: _rebuild(v, view) for k, v in spec[1]}
    if kind == "list":
        return [_rebuild(v, view) for v in spec[1]]
    if kind == "tuple":
        return tuple(_rebuild(v, view) for v in spec[1])
    return spec[1]


def _write(layout: _Layout, spec: Any) -> Shipment:
    """A new segment holding what ``layout`` placed (none when it placed nothing)."""
    if not layout.parts:
        return Shipment("", 0, spec)
    name, mapping = _create(layout.size)
    try:
        view = memoryview(mapping)
        for offset, write in layout.parts:
            write(view[offset:])
        del view
    finally:
        mapping.close()
    return Shipment(name, layout.size, spec)


class Shipment:
    """A value in a shared-memory segment: pickles as its name and layout, not its rows.

    Made in a worker (``pack``, or a :class:`Bundle`); unpickling it in the loop's process
    maps (and unlinks) the segment at once, so that a shipment torch drops unread frees its
    memory too.
    """

    def __init__(self, name: str, size: int, spec: Any) -> None:
        self.name = name
        self.size = size
        self.spec = spec
        self._mapping: mmap.mmap | None = None

    @classmethod
    def pack(cls, value: Any) -> Shipment:
        """Write ``value`` (see the module docstring) into a new segment."""
        layout = _Layout()
        return _write(layout, layout.spec(value))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_received, (self.name, self.size, self.spec))

    def open(self) -> Any:
        """The value, rebuilt over the shared pages (in the loop's process)."""
        if not self.name:
            return _rebuild(self.spec, memoryview(b""))
        if self._mapping is None:
            self._mapping = _attach(self.name, self.size)
        return _rebuild(self.spec, memoryview(self._mapping))


def _received(name: str, size: int, spec: Any) -> Shipment:
    shipment = Shipment(name, size, spec)
    if name:
        shipment._mapping = _attach(name, size)  # unlinked now, whatever becomes of it
    return shipment


class Bundle:
    """Values (what a collate made, batch after batch) gathered for one segment, in a worker."""

    def __init__(self) -> None:
        self._layout = _Layout()
        self._specs: list[Any] = []

    def add(self, value: Any) -> None:
        """Place one more value."""
        self._specs.append(self._layout.spec(value))

    @property
    def size(self) -> int:
        """Bytes placed so far (the segment's size)."""
        return self._layout.size

    def __len__(self) -> int:
        return len(self._specs)

    def ship(self) -> Shipment:
        """The segment of the values placed so far (a list of them, rebuilt)."""
        return _write(self._layout, ("list", self._specs))


def unpack(shipment: Shipment, group: Group, fmt: str) -> list[tuple[Any, Token]]:
    """In the loop's process: the batches of a group a worker shipped, with their tokens.

    A message as the server sent it becomes batches in ``fmt`` as an iteration cuts them
    (``formats.split``); what a collate made is its batch (a collate keeps the ``(batch,
    token)`` shape of its items).
    """
    if group.end:
        return []
    value = shipment.open()
    if group.sizes is not None:
        return list(zip(split(value, group.sizes, fmt), group.tokens, strict=True))
    return [(made[0], token) for made, token in zip(value, group.tokens, strict=True)]
