"""A reading process keeps the memory of the messages its loop let go of (glibc only).

Each check runs in a fresh process: the thresholds are set once per process. Whether glibc
kept the memory is read from glibc itself (``mallinfo2``): a 4 MB block comes from the heap
instead of a mapping of its own, and the heap is not trimmed when it is freed again.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lavender_flight.client.allocator import ENV_KEEP
from tests.client.test_resume import write_dataset

glibc = pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc (>= 2.33) only",
)

# what the child does: read one iteration of the dataset through the client (which opens a
# real stream), then malloc and free a message-sized block twice and report what glibc did
CHILD = textwrap.dedent(
    """
    import ctypes, json, sys

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    from lavender_flight.client import Iteration
    from lavender_flight.client import api as lavender

    lavender.init(sys.argv[1])
    rows = sum(len(batch["uid"]) for batch in Iteration.from_dataset(sys.argv[2], batch_size=10))
    size = 4 << 20
    mapped = []
    for _ in range(2):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        mapped.append(libc.mallinfo2().hblkhd)
        libc.free(block)
    after = libc.mallinfo2()
    print(json.dumps({"rows": rows, "mapped": mapped, "free_kept": after.fordblks}))
    """
)


def _child(api_url: str, dataset_id: str, keep: str | None) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != ENV_KEEP}
    if keep is not None:
        env[ENV_KEEP] = keep
    done = subprocess.run(
        [sys.executable, "-c", CHILD, api_url, dataset_id],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    found: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


@glibc
def test_a_process_that_read_a_stream_keeps_message_memory(
    api_url: str, client: object, data_dir: Path
) -> None:
    dataset_id = write_dataset("allocator", data_dir / "main", shards=2, rows=50)
    kept = _child(api_url, dataset_id, None)
    assert kept["rows"] == 100
    # the 4 MB block comes from the heap (no mapping of its own, the first time or the
    # second) and, freed, stays there for the next message instead of going back to the
    # kernel
    assert kept["mapped"][0] < 4 << 20 and kept["mapped"][1] < 4 << 20
    assert kept["free_kept"] >= 4 << 20

    # told not to, the client leaves glibc's defaults: the first 4 MB block is a mapping
    # of its own (glibc maps blocks from 128 KiB up until it has seen one freed)
    left = _child(api_url, dataset_id, "0")
    assert left["rows"] == 100
    assert left["mapped"][0] >= 4 << 20
