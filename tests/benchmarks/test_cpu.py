"""CPU seconds of processes: every thread's (ended ones too), per run, and an epoch's floor."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from benchmarks import cpu
from benchmarks.case import Cpu
from benchmarks.side_by_side import cpu_medians

# burns ``seconds`` of CPU in a thread that then ends, says so, and waits to be killed
BURN_IN_A_THREAD = """
import sys, threading, time
def burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
thread = threading.Thread(target=burn, args=(float(sys.argv[1]),))
thread.start()
thread.join()
print("done", flush=True)
time.sleep(60)
"""


@contextmanager
def _burnt(seconds: float) -> Iterator[subprocess.Popen[str]]:
    """A process that burnt ``seconds`` of CPU in a thread that ended; killed on leaving."""
    with subprocess.Popen(
        [sys.executable, "-c", BURN_IN_A_THREAD, str(seconds)], stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "done"
            yield process
        finally:
            process.kill()


def test_a_process_counts_the_cpu_of_its_threads_that_ended() -> None:
    with _burnt(0.3) as process:
        spent = cpu.process_cpu_s(process.pid)
        assert spent is not None
        assert 0.3 <= spent < 3.0  # the thread's 0.3 s, plus the interpreter's start-up
        # read from the process's CPU clock (ns), not /proc's 10 ms ticks
        assert abs(spent * 100 - round(spent * 100)) > 1e-9
        own = cpu.process_cpu_s(os.getpid())
        assert own is not None and own == pytest.approx(time.process_time(), abs=0.05)
    assert cpu.process_cpu_s(process.pid) is None  # gone


def test_a_run_counts_a_worker_started_in_it_whole_and_one_already_there_by_its_delta() -> None:
    with _burnt(0.2) as there:
        run = Cpu(server_pid=there.pid, workers=[there.pid])
        end = time.thread_time() + 0.1
        while time.thread_time() < end:  # the loop thread's own work
            pass
        with _burnt(0.25) as started:
            spent = run.done([there.pid, started.pid])
    assert spent["loop_thread"] is not None and spent["loop_thread"] >= 0.1
    assert spent["client"] is not None and spent["client"] >= spent["loop_thread"]
    # ``there`` burnt before the run (a sleeping process spends ~nothing): only ``started``
    assert spent["workers"] is not None and 0.25 <= spent["workers"] < 2.5
    assert spent["server"] is not None and spent["server"] < 0.05
    gone = Cpu(server_pid=None).done([there.pid])  # a worker that ended is not counted
    assert gone["workers"] is None and gone["server"] is None


def test_an_epoch_takes_at_least_its_loop_threads_cpu_and_all_its_cpu_over_the_cores() -> None:
    spent = {"client": 0.10, "loop_thread": 0.08, "workers": 0.08, "server": 0.06}
    assert cpu.epoch_floor_s(spent, cores=2) == pytest.approx(0.12)  # 0.24 over 2 cores
    assert cpu.epoch_floor_s(spent, cores=8) == pytest.approx(0.08)  # its loop thread
    assert cpu.epoch_floor_s({**spent, "workers": None, "server": None}, 2) == 0.08
    assert cpu.epoch_floor_s({**spent, "loop_thread": None}, 2) is None


def test_a_cases_record_holds_the_medians_of_what_each_process_spent() -> None:
    runs = [
        {"cpu": {"client": c, "loop_thread": c - 0.02, "workers": w, "server": 0.05}}
        for c, w in ((0.10, 0.08), (0.12, None), (0.11, 0.09))
    ]
    record = cpu_medians(runs)
    assert record["cpu_s"]["client"] == pytest.approx(0.11)
    assert record["cpu_s"]["server"] == pytest.approx(0.05)
    assert record["cpu_s"]["workers"] is None  # not measured in every run
    assert record["cores"] == cpu.cores()
    floors = [cpu.epoch_floor_s(r["cpu"], cpu.cores()) for r in runs]
    assert record["floor_s"] == pytest.approx(sorted(floors)[1])
    assert cpu_medians([{"rows": 1}]) == {}
