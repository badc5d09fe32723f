"""CPU seconds of processes, read from ``/proc``: what a measured epoch cost each of them.

A rate says how long an epoch took; the CPU seconds of every process that served it (the
loop's process and its loop thread, a ``DataLoader``'s workers, the server) say what it
cost, and so how fast it could go on this machine: an epoch takes at least its loop
thread's CPU (one thread does it) and at least the CPU of all its processes over the
machine's cores (:func:`epoch_floor_s`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["cores", "epoch_floor_s", "process_cpu_s", "processes_cpu_s"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cores() -> int:
    """The cores this process may run on (its affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds of process ``pid`` so far, every thread's (ended ones too); None if gone.

    Linux's CPU clock of the process (``clock_gettime`` on the clock id of ``pid``: to the
    nanosecond), else ``/proc/<pid>/stat``'s user + system time (in clock ticks, 10 ms).
    The live threads' ``schedstat`` would miss the threads that ended: a worker's
    connection threads of an epoch end with it.
    """
    try:
        return time.clock_gettime(_process_clock(pid))
    except (OSError, AttributeError, OverflowError):
        pass
    try:
        # the command name (field 2) may hold spaces and parentheses: split after its end
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def _process_clock(pid: int) -> int:
    # Linux's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED): what clock_getcpuclockid returns
    return (~pid << 3) | 2


def processes_cpu_s(pids: Iterable[int]) -> float | None:
    """The summed CPU seconds of these processes; None if one of them is gone (or none)."""
    total = 0.0
    found = False
    for pid in pids:
        seconds = process_cpu_s(pid)
        if seconds is None:
            return None
        total += seconds
        found = True
    return total if found else None


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
