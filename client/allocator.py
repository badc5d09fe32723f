"""Message memory: glibc keeps the pages of the stream messages a loop has let go of.

gRPC lays each incoming message (up to 4 MB) out in one buffer it ``malloc``-s. With glibc's
defaults the heap is trimmed as soon as two such buffers are free at its top, and large ones
are mapped apart, so the next message's buffer is fresh memory that the kernel faults in
page by page: about a quarter of a reading process's CPU went to that (``perf``: page faults
and page clearing under the copy of every message), and in-order iteration ran about 15-20 %
slower than with the pages kept.

:func:`keep_message_memory` raises glibc's trim threshold to :data:`TRIM_BYTES` and fixes the
threshold of separate mappings at :data:`MMAP_BYTES`, once per process, when its first
stream opens. A process then keeps up to ``TRIM_BYTES`` of freed heap for its next messages
(its peak RSS is unchanged: only the return of free memory to the kernel is held back).
``LAVENDER_FLIGHT_KEEP_MESSAGE_MEMORY=0`` leaves the allocator as it was; on a C library that
is not glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

__all__ = ["ENV_KEEP", "MMAP_BYTES", "TRIM_BYTES", "keep_message_memory"]

log = logging.getLogger(__name__)

ENV_KEEP = "LAVENDER_FLIGHT_KEEP_MESSAGE_MEMORY"
"""Set to ``0`` to leave the C allocator's thresholds as they are."""
TRIM_BYTES = 256 << 20
"""Free heap a process may keep at the top of its heap (glibc's ``M_TRIM_THRESHOLD``)."""
MMAP_BYTES = 32 << 20
"""Allocations from this size up get a mapping of their own (glibc's ``M_MMAP_THRESHOLD``;
its largest allowed value on 64-bit): a 4 MB message comes from the heap."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_lock = threading.Lock()
_done: bool | None = None


def keep_message_memory() -> bool:
    """Raise glibc's thresholds once per process; whether they are raised (see the module)."""
    global _done
    with _lock:
        if _done is None:
            _done = _raise_thresholds()
        return _done


def _raise_thresholds() -> bool:
    if os.environ.get(ENV_KEEP, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded: no ``find_library`` subprocess
        mallopt = libc.mallopt
        # gnu_get_libc_version exists only in glibc: musl and others are left alone
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)
    )
    log.debug("glibc keeps freed message memory: %s", done)
    return done
