"""CPU seconds of processes (their Linux CPU clocks): what a measured epoch cost each of them.

A rate says how long an epoch took; the CPU seconds of every process that served it (the
loop's process and its loop thread, a ``DataLoader``'s workers, the server) say what it
cost, and so how fast it could go on this machine: an epoch takes at least its loop
thread's CPU (one thread does it) and at least the CPU of all its processes over the
machine's cores (:func:`epoch_floor_s`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

__all__ = ["cores", "epoch_floor_s", "process_cpu_s"]


def cores() -> int:
    """The cores this process may run on (its affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds of process ``pid`` so far, every thread's (ended ones too); None if gone.

    Linux's CPU clock of the process (``clock_gettime`` on the clock id of ``pid``), to
    the nanosecond. ``/proc/<pid>/stat`` counts in 10 ms ticks, a tenth of a small epoch;
    the live threads' ``schedstat`` misses the threads that ended (a worker's connection
    threads end with its epoch: 0.027 against 0.045 s a worker, measured).
    """
    try:
        return time.clock_gettime(_process_clock(pid))
    except (OSError, AttributeError, OverflowError):  # gone (or not Linux)
        return None


def _process_clock(pid: int) -> int:
    # Linux's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED): what clock_getcpuclockid returns
    return (~pid << 3) | 2


def epoch_floor_s(cpu: Mapping[str, float | None], cores: int) -> float | None:
    """The least time an epoch that cost ``cpu`` can take on ``cores`` cores.

    ``cpu``: CPU seconds of the epoch: ``loop_thread`` (the thread that iterates),
    ``client`` (its whole process), and ``workers`` and ``server`` where there are some
    (None: not measured). The epoch takes at least its loop thread's CPU (work of one
    thread) and at least the CPU of all its processes spread over every core. None when
    the loop thread or the client was not measured.
    """
    loop, client = cpu.get("loop_thread"), cpu.get("client")
    if loop is None or client is None or cores < 1:
        return None
    total = client + (cpu.get("workers") or 0.0) + (cpu.get("server") or 0.0)
    return max(loop, total / cores)
