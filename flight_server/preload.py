"""What a server process sets before pyarrow loads: its allocator reads it once, at load.

Imported first by the package (``flight_server/__init__.py``), before anything imports
pyarrow. Nothing here may import pyarrow.
"""

from __future__ import annotations

import os
import sys

__all__ = ["MIMALLOC_PURGE_DELAY_MS", "allocator_environment"]

MIMALLOC_PURGE_DELAY_MS = 10_000
"""How long mimalloc keeps a thread's freed pages before it gives them back on its own."""


def allocator_environment() -> bool:
    """Make mimalloc keep freed pages ``MIMALLOC_PURGE_DELAY_MS``; whether it could.

    mimalloc (``engine.blocks.block_pool``: a shuffled block's largest buffers) gives
    freed pages back to the system on its own a while after they were freed (its
    ``purge_delay``: 1 s as pyarrow 26 builds it), at its next call. Shuffled epochs of
    4 KiB values, each a new iteration a second or two after the last, found the pages of
    the last epoch's blocks purged and the kernel faulted the next ones in page by page
    (``perf`` of the server: 47 % of its time in ``clear_page``; the second epoch of each
    side by side round 0.11-0.15 M rows/s, 0.33-0.44 with this). The server gives them
    back itself, once its streams are idle or past a bound (``engine.blocks.IdleRelease``),
    so mimalloc's own delay only has to outlast the gaps between blocks.

    Only before pyarrow is loaded (later, mimalloc has read its options: nothing is set).
    A ``MIMALLOC_PURGE_DELAY`` in the environment wins.
    """
    if "pyarrow" in sys.modules:
        return False
    os.environ.setdefault("MIMALLOC_PURGE_DELAY", str(MIMALLOC_PURGE_DELAY_MS))
    return True
