"""The targets table judges a run's figures: ratios of the same run, bounds, budgets, gaps."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from benchmarks import common, targets
from benchmarks.first_batch import SHUFFLED
from benchmarks.loader import CASES


def _case(case: str, rate: float, dataset: str = "text", **extra: Any) -> dict[str, Any]:
    return {"dataset": dataset, "group": "lavender", "case": case, "samples_per_s": rate, **extra}


def _results() -> dict[str, Any]:
    side = [
        _case("bare flight do_get b1024", 10e6),
        _case("lavender arrow b1024", 8.5e6),  # 0.85 of bare: met
        _case("lavender arrow b1024 shuffled", 3e6),  # 0.3: missed
        _case("bare flight do_get b1024", 1e6, "binary"),
        _case("lavender arrow b1024", 0.5e6, "binary"),
        {"dataset": "binary", "group": "lavender", "case": "lavender arrow b1024 shuffled",
         "not_measured": "case failed: boom"},
        _case("lavender arrow b1024 filtered (uid%2==0)", 4e6),  # 0.47 of plain: met
    ]  # fmt: skip
    return {
        "side_by_side": {"cases": side, "server_rss_after_mb": 2100.0, "memory_budget_mb": None},
        "first": {"cases": [_case(SHUFFLED, 12.0, first_batch_s=0.076)]},
        "memory": {"max_mb": 1250.0, "growth_mb": 12.0, "memory_budget_mb": 1024.0},
    }


def _row(rows: list[dict[str, Any]], name: str, dataset: str = "text") -> dict[str, Any]:
    (row,) = [r for r in rows if r["target"].startswith(name) and r["dataset"] in (dataset, "")]
    return row


def test_ratios_are_judged_against_their_baseline_of_the_same_run() -> None:
    rows = targets.evaluate(_results())
    in_order = _row(rows, "in order, Arrow")
    assert in_order["measured"] == 0.85
    assert in_order["baseline"] == 10e6
    assert in_order["status"] == "met"
    assert _row(rows, "in order, Arrow", "binary")["status"] == "missed"
    assert _row(rows, "shuffled")["status"] == "missed"
    filtered = _row(rows, "filtered")
    assert round(filtered["measured"], 3) == round(4e6 / 8.5e6, 3)
    assert filtered["status"] == "met"


def test_absolute_bounds_use_the_targets_unit() -> None:
    first = _row(targets.evaluate(_results()), "first batch, shuffled")
    assert first["measured"] == 76.0
    assert first["status"] == "missed"
    assert "76 ms" in targets.render([first])


def test_memory_bounds_wait_for_a_budget() -> None:
    rows = targets.evaluate(_results())
    after = _row(rows, "server RSS after the side-by-side run")
    assert after["measured"] == 2100.0
    assert after["status"] == "n/a (no budget yet)"
    peak = _row(rows, "server RSS, max over 100 iterations")
    assert peak["bound"] == 1324.0
    assert peak["status"] == "met"
    assert _row(rows, "server RSS flat")["status"] == "met"


def test_gaps_say_why_and_only_broken_cases_fail_the_check() -> None:
    rows = targets.evaluate(_results())
    loader = _row(rows, "torch DataLoader 2 workers (2nd epoch) vs 0, CPU collate")
    assert loader["status"] == "not run (--suites loader)"
    assert loader["baseline_case"] == CASES[0]
    broken = _row(rows, "shuffled", "binary")
    assert broken["status"].startswith("not measured: lavender arrow b1024 shuffled: case failed")
    missing = _row(rows, "byte_tokenize")
    assert missing["status"].startswith("not measured: no case")
    failed = targets.failed(rows)
    assert broken in failed and missing in failed
    assert _row(rows, "shuffled") in failed  # missed
    assert loader not in failed
    assert _row(rows, "server RSS after the side-by-side run") not in failed  # n/a
    table = targets.render(rows)
    assert table.splitlines()[0].startswith("Targets: ")
    assert len(table.splitlines()) == len(rows) + 3


def test_the_memory_budget_is_read_from_the_servers_banner() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"], text=True)
    process.wait(timeout=30)
    server = common.Server(process, "grpc://127.0.0.1:1", log=["  catalog  x.db"])
    assert common.memory_budget_mb(server, wait=0) is None
    server.log.append("  memory   budget 2 GiB (decoded shards, blocks, read-ahead)")
    assert common.memory_budget_mb(server, wait=0) == 2048.0
    server.log[-1] = "  memory   budget 1536 MiB"
    assert common.memory_budget_mb(server, wait=0) == 1536.0


def test_a_loader_row_shows_the_ratio_this_machines_cores_allow() -> None:
    results = _results()
    side = results["side_by_side"]["cases"]
    side += [
        _case("lavender torch loader b1024 0 workers", 8e6),
        # an epoch of 1M rows in 0.2 s whose CPU could not take less than 0.16 s
        _case("lavender torch loader b1024 2 workers, 2nd epoch", 5e6, rows=1_000_000,
              floor_s=0.16),
    ]  # fmt: skip
    row = _row(targets.evaluate(results), "torch DataLoader 2 workers (2nd epoch) vs 0, small")
    assert row["measured"] == 5e6 / 8e6
    assert row["status"] == "missed"
    assert row["ceiling"] == 1_000_000 / 0.16 / 8e6  # 0.78: short of 0.8 for want of cores
    assert "this machine's ceiling: 0.78" in targets.render([row])
    side[-1] = {k: v for k, v in side[-1].items() if k != "floor_s"}  # CPU not measured
    row = _row(targets.evaluate(results), "torch DataLoader 2 workers (2nd epoch) vs 0, small")
    assert row["ceiling"] is None and "ceiling" not in targets.render([row])
    assert _row(targets.evaluate(results), "in order, Arrow")["ceiling"] is None
