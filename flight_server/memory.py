"""The server's one memory budget: decoded shard files in one LRU, room reserved for the rest.

Every shard file the server decodes (the rows one read of one file gives: by shardset,
shard, content digest and columns) is kept in one least-recently-used cache shared by every
read of the server: iterations, epochs, joins, previews. A dataset that fits is decoded
once: its second epoch, and the next iteration over it, read no file.

What streams hold besides is *reserved* in the same budget while it lives: blocks gathered
into an epoch's order or thinned by a filter, and the read-ahead of windowed streams. The
cache gives way to reservations (least recently used first); a reservation that finds the
budget held by other reservations waits for them (up to ``wait_seconds``) rather than
growing the server past its budget. So the server's memory is the budget plus a fixed
overhead, whatever the number of iterations.

Sizes are Arrow buffer bytes (``table_bytes``): what the rows hold in memory, not what
their files weigh.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

__all__ = [
    "DEFAULT_FRACTION",
    "MemoryBudget",
    "Reservation",
    "default_budget_bytes",
    "heap_in_use_bytes",
    "machine_memory",
    "no_huge_pages",
    "release_pool",
    "resident_bytes",
    "system_allocator",
    "table_bytes",
    "tune_malloc",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_FRACTION = 4
"""The default budget is this fraction (1/4) of the machine's memory."""
FALLBACK_BYTES = 2 << 30
"""The default budget where the machine's memory cannot be read."""
PR_SET_THP_DISABLE = 41
M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
MALLOC_ARENAS = 2
"""glibc malloc arenas the server keeps (``tune_malloc``)."""
MMAP_THRESHOLD = 32 << 20
"""Allocations above this get their own mapping (glibc's most)."""
TRIM_THRESHOLD = 128 << 20
"""Free memory at the top of a heap kept for reuse, up to this."""


def machine_memory() -> int | None:
    """The machine's memory in bytes (``MemTotal`` of ``/proc/meminfo``), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if hasattr(os, "sysconf"):  # pragma: no cover - not Linux
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (OSError, ValueError):
            return None
    return None  # pragma: no cover


def default_budget_bytes() -> int:
    """A quarter of the machine's memory (2 GiB where it cannot be read)."""
    total = machine_memory()
    return total // DEFAULT_FRACTION if total else FALLBACK_BYTES


def no_huge_pages() -> bool:
    """Turn transparent huge pages off for this process (Linux); whether it could.

    Blocks are allocated and freed all the time (an epoch's order, messages); where the
    kernel backs such memory with 2 MiB pages (``madvise`` mode: the allocator asks for
    them), every fault zeroes, and may compact, 2 MiB: measured here, that was 30-60 % of
    a shuffled epoch's server CPU in the kernel, against about 10 % with 4 KiB pages.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def tune_malloc(arenas: int = MALLOC_ARENAS) -> bool:
    """Set glibc's malloc up for a server of large, short-lived buffers (Linux); whether it could.

    Call it before the server's threads start. Three settings, each left alone when its
    ``MALLOC_*`` variable is in the environment:

    - ``arenas`` arenas (glibc's default: up to 8 a core, each keeping what was freed in
      it): the read threads' numpy arrays left the RSS growing iteration after iteration.
    - Buffers up to 32 MiB from the heap, not ``mmap`` (glibc's adaptive threshold off):
      a block's gathered pieces and messages are allocated and freed all the time, and a
      fresh mapping costs a page fault (and zeroing) per 4 KiB each time.
    - A trim threshold of 128 MiB: what is freed stays for the next block, and goes back to
      the system once the streams have been idle a while (``engine.blocks.IdleRelease``).

    With Arrow on this allocator (``system_allocator``), ``python -m benchmarks run --suites
    memory`` (100 iterations of six kinds over 1M rows) grew 3-19 MB from the 10th iteration
    to the 100th; with mimalloc 79 MB, with jemalloc 80 MB. Shuffled epochs ran within the
    machine's noise of the others (medians of 3 x 6 epochs: 3.9, 4.1 and 4.3 M rows/s for
    glibc, mimalloc and jemalloc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = True
        for variable, option, value in (
            ("MALLOC_ARENA_MAX", M_ARENA_MAX, arenas),
            ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        ):
            if variable not in os.environ:
                done = int(libc.mallopt(option, value)) == 1 and done
        return done
    except (OSError, AttributeError):
        return False


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        found = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None
    found.restype = _MallInfo2
    found.argtypes = []
    return found


def heap_in_use_bytes() -> int | None:
    """Bytes glibc's malloc has handed out and not been given back (``mallinfo2``).

    Its heaps' chunks in use and its own mappings (buffers over the mmap threshold). None
    where it cannot be read (not glibc, or older than 2.33). About 0.2 us a call here
    (it walks the arenas' bins: more for a large, fragmented heap).
    """
    found = _mallinfo2()
    if found is None:
        return None
    info = found()
    return int(info.uordblks + info.hblkhd)


def resident_bytes() -> int | None:
    """This process's resident memory (``/proc/self/statm``), None where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def system_allocator() -> bool:
    """Make the C library's malloc Arrow's allocator in this process; whether it did.

    pyarrow's default (mimalloc) kept what a server freed, iteration after iteration (see
    ``tune_malloc`` for the figures); glibc's malloc, set up by ``tune_malloc``, gives it
    back once the streams are idle, at a speed within this machine's noise of the others.
    An ``ARROW_DEFAULT_MEMORY_POOL`` in the environment wins.
    """
    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ or not sys.platform.startswith("linux"):
        return False
    pa.set_memory_pool(pa.system_memory_pool())
    return True


def release_pool(pool: pa.MemoryPool) -> bool:
    """Give the pages ``pool`` keeps for reuse back to the system; whether it could.

    ``MemoryPool.release_unused`` releases pyarrow's *default* pool whichever pool it is
    called on (pyarrow 26: it asks ``c_get_memory_pool()``, not its own pool), so it is
    called only on the default here. For mimalloc's pool this calls mimalloc's collect
    (``arrow_mi_collect``, which libarrow exports): it gives back the freed pages of every
    thread, whichever allocated or freed them (measured: 192 MiB allocated on one thread,
    freed on another, given back from a third). Another pool (jemalloc's beside a default
    of another backend): nothing (False).
    """
    default = pa.default_memory_pool()  # a new wrapper at each call: compared by backend
    if pool.backend_name == default.backend_name:
        default.release_unused()
        return True
    if pool.backend_name == "mimalloc":
        collect = _mimalloc_collect()
        if collect is not None:
            collect(True)
            return True
    return False


@functools.cache
def _mimalloc_collect() -> Callable[[bool], None] | None:
    """The ``mi_collect`` libarrow exports (mimalloc's, under Arrow's prefix), or None."""
    folder = Path(pa.__file__).parent
    for path in sorted(folder.glob("libarrow.so*")) + sorted(folder.glob("libarrow*.dylib")):
        try:
            found = ctypes.CDLL(str(path)).arrow_mi_collect
        except (OSError, AttributeError):
            continue
        found.argtypes = [ctypes.c_bool]
        found.restype = None
        return found
    log.debug("no arrow_mi_collect in %s: mimalloc gives its pages back on its own", folder)
    return None


def table_bytes(value: Any) -> int:
    """The bytes a table (or record batch) holds in memory: its buffers, whole."""
    if isinstance(value, (pa.Table, pa.RecordBatch)):
        return int(value.get_total_buffer_size())
    return int(getattr(value, "nbytes", 0))


def _mib(value: float) -> str:
    return f"{value / (1 << 20):,.0f} MiB"


@dataclass
class _Entry:
    """One cached value (or the read of it, while it runs)."""

    future: Future[Any]
    size: int = 0
    done: bool = False


class Reservation:
    """Room held in a budget until ``release`` (or ``resize`` to another size)."""

    def __init__(self, budget: MemoryBudget, nbytes: int, waits: bool = True) -> None:
        self._budget = budget
        self.nbytes = nbytes
        self.waits = waits  # made by a reader that waits for room (a block), not read-ahead

    def resize(self, nbytes: int) -> None:
        """Hold ``nbytes`` from now on (never waits: the memory is already in use)."""
        self._budget._resize(self, max(0, int(nbytes)))

    def release(self) -> None:
        """Give the room back (twice is fine)."""
        self._budget._resize(self, 0)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class MemoryBudget:
    """One budget for a server's decoded data (see the module docstring).

    Args:
        max_bytes: the budget.
        wait_seconds: how long a reservation waits for others to free room before it goes
            over the budget anyway (logged: the alternative is a stream that never moves).
    """

    def __init__(self, max_bytes: int | None = None, wait_seconds: float = 30.0) -> None:
        self.max_bytes = int(max_bytes if max_bytes is not None else default_budget_bytes())
        self.wait_seconds = wait_seconds
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._kept = 0
        self._reserved = 0
        self._reservations = 0
        self._waiting_reserved = 0  # what reservations that wait for room hold (blocks)
        self._cond = threading.Condition()
        self.hits = 0
        self.misses = 0

    # -- what it holds -------------------------------------------------------------------

    @property
    def kept_bytes(self) -> int:
        """Bytes of the cached files."""
        return self._kept

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by what streams hold."""
        return self._reserved

    @property
    def used_bytes(self) -> int:
        """Cached and reserved bytes together."""
        return self._kept + self._reserved

    def peek(self, key: Hashable) -> Any | None:
        """The value kept under ``key`` (a use of it, as ``get``'s), else None: never loads.

        A value still being loaded counts as absent: the caller, which would rather not
        wait, reads it the usual way.
        """
        with self._cond:
            entry = self._entries.get(key)
            if entry is None or not entry.done:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.future.result()

    def __contains__(self, key: Hashable) -> bool:
        with self._cond:
            entry = self._entries.get(key)
            return entry is not None and entry.done

    def describe(self) -> str:
        """The budget in words (the server's banner)."""
        total = machine_memory()
        share = f"{self.max_bytes / total:.0%} of this machine's {_mib(total)}" if total else ""
        return (
            f"budget {self.max_bytes >> 20} MiB ({share + '; ' if share else ''}decoded shards "
            "in one LRU shared by every iteration, blocks and read-ahead reserved in it)"
        )

    # -- the cache -----------------------------------------------------------------------

    def get(
        self, key: Hashable, load: Callable[[], T], weigh: Callable[[Any], int] = table_bytes
    ) -> T:
        """The value cached under ``key``, else ``load()`` (then kept, evicting the oldest).

        Readers asking for a value being loaded wait for that load instead of repeating it;
        a failed load is not kept (the next reader tries again). A value larger than the
        whole budget is returned and not kept.
        """
        with self._cond:
            entry = self._entries.get(key)
            owner = entry is None
            if entry is None:
                entry = self._entries[key] = _Entry(Future())
                self.misses += 1
            else:
                self._entries.move_to_end(key)
                self.hits += 1
        if not owner:
            return entry.future.result()
        try:
            value = load()
        except BaseException as exc:
            with self._cond:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            entry.future.set_exception(exc)
            raise
        entry.future.set_result(value)  # from here on every reader takes it from the entry
        size = weigh(value)
        with self._cond:
            if self._entries.get(key) is not entry:
                return value
            if size > self.max_bytes:  # larger than the whole budget: never kept
                del self._entries[key]
                return value
            entry.size, entry.done = size, True
            self._kept += size
            self._evict()
        return value

    def forget(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop the cached values whose key matches; how many bytes that freed."""
        with self._cond:
            freed = 0
            for key in [k for k, e in self._entries.items() if e.done and predicate(k)]:
                freed += self._drop(key)
            self._cond.notify_all()
            return freed

    def clear(self) -> None:
        """Drop every cached value (reservations stay)."""
        self.forget(lambda key: True)

    def _drop(self, key: Hashable) -> int:
        entry = self._entries.pop(key)
        self._kept -= entry.size
        return entry.size

    def _evict(self, room: int = 0) -> None:
        """Drop the least recently used values until ``room`` more bytes fit (lock held)."""
        if self._kept + self._reserved + room <= self.max_bytes:
            return
        for key in list(self._entries):
            if self._kept + self._reserved + room <= self.max_bytes:
                break
            if self._entries[key].done:
                self._drop(key)

    # -- reservations --------------------------------------------------------------------

    def reserve(self, nbytes: int, wait: bool = True) -> Reservation:
        """Hold ``nbytes`` for what a stream keeps (the cache gives way first).

        With ``wait``, when other reservations that waited hold the budget (blocks: they
        come back as streams move on), wait for them to release room (up to
        ``wait_seconds``; then go over the budget, logged). Without, never wait, and never
        make the others wait: a stream's read-ahead is held for its whole life, so a block
        of that very stream waiting for it would wait for itself.
        """
        nbytes = max(0, int(nbytes))
        deadline = time.monotonic() + self.wait_seconds
        with self._cond:
            self._evict(nbytes)
            while (
                wait
                and self._waiting_reserved
                and self._waiting_reserved + nbytes > self.max_bytes
                and nbytes <= self.max_bytes
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "memory budget of %s held by what streams keep (%s reserved): going "
                        "over it by %s rather than waiting longer (raise --memory-mb?)",
                        _mib(self.max_bytes), _mib(self._waiting_reserved),
                        _mib(self._waiting_reserved + nbytes - self.max_bytes),
                    )  # fmt: skip
                    break
                self._cond.wait(left)
                self._evict(nbytes)
            reservation = Reservation(self, nbytes, waits=wait)
            self._reserved += nbytes
            if wait:
                self._waiting_reserved += nbytes
            if nbytes:
                self._reservations += 1
            return reservation

    def _resize(self, reservation: Reservation, nbytes: int) -> None:
        with self._cond:
            if reservation.nbytes == 0 and nbytes == 0:
                return
            if reservation.nbytes == 0:
                self._reservations += 1
            elif nbytes == 0:
                self._reservations -= 1
            self._reserved += nbytes - reservation.nbytes
            if reservation.waits:
                self._waiting_reserved += nbytes - reservation.nbytes
            reservation.nbytes = nbytes
            if nbytes:
                self._evict()
            self._cond.notify_all()
