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
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import util
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .formats import split

__all__ = [
    "GROUP_BYTES",
    "Bundle",
    "Group",
    "Shipment",
    "Token",
    "forget",
    "sweep_at_exit",
    "sweep_ended",
    "sweep_when_gone",
    "sweep_worker",
    "unpack",
]

ALIGN = 64
RING_SLOTS = 8
"""Segments a worker keeps for reuse (torch's prefetch, the loop's turns and its batch)."""
RING_GRAIN = 1 << 20
MAPPED_SLOTS = 64
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


def sweep_worker(pid: int) -> None:
    """In the loop's process: unlink what a worker that died (``pid``) left behind."""
    _sweep(os.getpid(), pid)


def sweep_when_gone(processes: Iterable[Any], seconds: float = 120.0) -> None:
    """In the loop's process: once these workers have ended, unlink what they left behind.

    A worker unlinks its own segments at a clean exit; torch terminates one that takes
    longer than its shutdown wait (a loaded machine), and a terminated worker runs no exit
    hook. A daemon thread waits on the workers' sentinels (it reaps nothing: torch joins
    them) for up to ``seconds``; what is left after that goes at the loop's exit.
    """
    waiting = {p.sentinel: p.pid for p in processes if p.pid is not None}
    if not waiting:
        return

    def reap() -> None:
        deadline = time.monotonic() + seconds
        while waiting and time.monotonic() < deadline:
            try:
                ended = wait(list(waiting), timeout=1.0)
            except (OSError, ValueError):  # a sentinel closed (Process.close): poll by pid
                ended = [s for s, pid in waiting.items() if not _alive(pid)]
            for sentinel in ended:
                _worker_gone(waiting.pop(sentinel))

    try:
        threading.Thread(target=reap, name="lf-shm-sweep", daemon=True).start()
    except RuntimeError:  # the interpreter is exiting: its own sweep (sweep_at_exit) follows
        return


def sweep_ended(processes: Iterable[Any]) -> None:
    """In the loop's process: unlink now what those of these workers that ended left."""
    for process in processes:
        if not process.is_alive():
            _worker_gone(process.pid)


def _worker_gone(pid: int) -> None:
    """A worker ended: drop its slots' mappings and unlink what it left."""
    forget([pid])
    sweep_worker(pid)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _sweep(pid: int, worker: int | None = None) -> None:
    pattern = f"lf_{pid}_*" if worker is None else f"lf_{pid}_{worker}_*"
    for path in Path("/dev/shm").glob(pattern):
        try:
            _posixshmem.shm_unlink("/" + path.name)
        except OSError:
            continue


def _create(size: int, written: bool = True) -> tuple[str, mmap.mmap]:
    """A new segment of ``size`` bytes, mapped for writing (``written``: unlinked at exit)."""
    name = f"/lf_{os.getppid()}_{os.getpid()}_{secrets.token_hex(8)}"
    fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        os.ftruncate(fd, max(1, size))
        mapping = mmap.mmap(fd, max(1, size))
    finally:
        os.close(fd)
    if written:
        _written.add(name)
    return name, mapping


class _Slot:
    """A segment a worker writes again and again (its first byte: 1 while the loop holds it)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.name, self.mapping = _create(size, written=False)

    @property
    def free(self) -> bool:
        return self.mapping[0] == 0

    def drop(self) -> None:
        self.mapping.close()
        try:
            _posixshmem.shm_unlink(self.name)
        except FileNotFoundError:
            pass  # the loop's process swept it (its worker was taken for dead)


class _Ring:
    """A worker's reused segments: writing into pages already there costs no page faults.

    A fresh segment costs its pages' faults and zeroing on each side (about 4 ms for a
    4 MiB message, 30 times what copying it does). The loop's process marks a slot free
    when the last batch over it is gone; a worker whose slots are all held (a loop keeping
    its batches) ships in one-off segments, as before.
    """

    def __init__(self) -> None:
        self.slots: list[_Slot] = []
        self.retired: list[str] = []
        """Slots dropped since the last shipment (the loop's process forgets their mappings)."""
        self.lock = threading.Lock()

    def take(self, size: int) -> _Slot | None:
        """A free slot of at least ``size`` bytes (a new or larger one if need be), marked held."""
        with self.lock:
            if not self.slots:
                util.Finalize(None, self.drop_all, exitpriority=10)
            free = [slot for slot in self.slots if slot.free]
            slot = next((s for s in free if s.size >= size), None)
            if slot is None and (free or len(self.slots) < RING_SLOTS):
                if free:  # too small: one larger in its place
                    self.slots.remove(free[0])
                    free[0].drop()
                    self.retired.append(free[0].name)
                slot = _Slot(-(-size // RING_GRAIN) * RING_GRAIN)
                self.slots.append(slot)
            if slot is not None:
                slot.mapping[0] = 1
            return slot

    def gone(self) -> list[str]:
        """The slots dropped since the last call."""
        with self.lock:
            names, self.retired = self.retired, []
        return names

    def drop_all(self) -> None:
        with self.lock:
            slots, self.slots = self.slots, []
        for slot in slots:
            slot.drop()


_ring = _Ring()


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


_mapped: dict[str, mmap.mmap] = {}
"""In the loop's process: the workers' slots, mapped once (a new mapping of 4 MiB costs
its page faults again, ~1-3 ms), by name; forgotten when their worker goes."""


def _attach_slot(name: str, size: int, capacity: int, gone: list[str]) -> memoryview:
    """The bytes of a worker's slot, shared; the slot is free again once they are gone.

    Everything rebuilt over them (tensors, Arrow buffers) keeps this array alive; its
    finalizer marks the slot free for the worker (the loop's writes into a tensor reach
    the slot, which the worker writes anew before it ships it again). ``gone``: slots the
    worker dropped (their mappings go once no batch uses them).
    """
    for old in gone:
        _mapped.pop(old, None)
    mapping = _mapped.get(name)
    if mapping is None or len(mapping) < ALIGN + size:
        fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
        try:
            mapping = mmap.mmap(fd, max(capacity, ALIGN + size))
        finally:
            os.close(fd)
        _mapped[name] = mapping
        while len(_mapped) > MAPPED_SLOTS:  # never more than a few loaders' worth
            _mapped.pop(next(iter(_mapped)))
    data = np.frombuffer(mapping, dtype=np.uint8, count=size, offset=ALIGN)
    weakref.finalize(data, _release, mapping)
    return data.data  # a view that keeps the array (and its finalizer) alive


def forget(workers: Iterable[int]) -> None:
    """In the loop's process: drop the mappings of these workers' slots (they are gone)."""
    pids = {str(pid) for pid in workers}
    for name in [n for n in _mapped if n.split("_")[2] in pids]:  # /lf_<loop>_<worker>_...
        _mapped.pop(name, None)


def _release(mapping: mmap.mmap) -> None:
    try:
        mapping[0] = 0
    except ValueError:  # pragma: no cover - closed at the process's exit
        pass


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
    """A segment holding what ``layout`` placed: a free slot of the ring, else a new one."""
    if not layout.parts:
        return Shipment("", 0, spec)
    slot = _ring.take(ALIGN + layout.size)
    if slot is not None:
        name, mapping, start = slot.name, slot.mapping, ALIGN
    else:
        (name, mapping), start = _create(layout.size), 0
    try:
        view = memoryview(mapping)
        for offset, write in layout.parts:
            write(view[start + offset :])
        del view
    finally:
        if slot is None:
            mapping.close()
    if slot is None:
        return Shipment(name, layout.size, spec)
    return Shipment(name, layout.size, spec, slot.size, _ring.gone())


class Shipment:
    """A value in a shared-memory segment: pickles as its name and layout, not its rows.

    Made in a worker (``pack``, or a :class:`Bundle`); unpickling it in the loop's process
    maps (and unlinks) the segment at once, so that a shipment torch drops unread frees its
    memory too.
    """

    def __init__(
        self, name: str, size: int, spec: Any, slot: int = 0, gone: list[str] | None = None
    ) -> None:
        self.name = name
        self.size = size
        self.spec = spec
        self.slot = slot
        """The size of the worker's ring slot it is in (0: a one-off segment)."""
        self.gone = gone or []
        """Slots the worker dropped before this shipment."""
        self._data: memoryview | None = None

    @classmethod
    def pack(cls, value: Any) -> Shipment:
        """Write ``value`` (see the module docstring) into a segment."""
        layout = _Layout()
        return _write(layout, layout.spec(value))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_received, (self.name, self.size, self.spec, self.slot, self.gone))

    def attach(self) -> None:
        """Map the segment (in the loop's process): a one-off one is unlinked at once."""
        if self._data is None and self.name:
            if self.slot:
                self._data = _attach_slot(self.name, self.size, self.slot, self.gone)
            else:
                self._data = memoryview(_attach(self.name, self.size))

    def open(self) -> Any:
        """The value, rebuilt over the shared pages (in the loop's process)."""
        if not self.name:
            return _rebuild(self.spec, memoryview(b""))
        self.attach()
        assert self._data is not None
        data, self._data = self._data, None  # the value keeps the pages, not the shipment
        return _rebuild(self.spec, data)


def _received(
    name: str, size: int, spec: Any, slot: int = 0, gone: list[str] | None = None
) -> Shipment:
    shipment = Shipment(name, size, spec, slot, gone)
    shipment.attach()  # unlinked (or held) now, whatever becomes of it
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
