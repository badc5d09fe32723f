"""The performance targets (project issue 16), as data, judged on the figures of one run.

Each :class:`Target` names the figure it judges and, for a ratio, the baseline it divides
by, both measured in the same run (``Ref``: a suite, a case of it and a field); the goal is
a bound on the ratio or on the value itself. :func:`evaluate` turns a run's results into one
row per target (and data set), :func:`render` prints them, ``--check`` exits non-zero when
:func:`failed` finds a target missed or its case broken. A target whose suite did not run is
"not run"; a memory bound over the server's budget is "n/a" until the server reports one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import first_batch, loader
from .side_by_side import SINGLE, _block, _rate

ALL_DATA = ("text", "binary", "tensor")
BARE = "bare flight do_get b1024"
# allowed growth of the server's median RSS from iterations 11-20 to 91-100 of the memory
# suite: the allocator's own noise (arenas, fragmentation), well under one decoded block
FLAT_MB = 64.0


@dataclass(frozen=True)
class Ref:
    """One figure of a run: ``field`` of case ``case`` of ``suite`` (no case: of the suite)."""

    suite: str
    case: str | None = None
    field: str = "samples_per_s"


@dataclass(frozen=True)
class Target:
    """A bound on a figure, or on its ratio to a baseline of the same run.

    ``plus_budget``: the bound is the server's memory budget + ``goal`` (MB). ``datasets``:
    one row per data set (case figures only). ``scale`` turns the figure into ``unit``.
    ``ceiling``: the row also shows the ratio this machine allows the measured case: its
    rows over the least time its CPU could take on these cores (the case's ``floor_s``,
    :func:`benchmarks.cpu.epoch_floor_s`), over the baseline. A ratio under its target and
    near its ceiling misses for want of cores, not for work that could go.
    """

    name: str
    measured: Ref
    baseline: Ref | None
    op: str
    goal: float
    datasets: tuple[str, ...] = ("text",)
    unit: str = ""
    scale: float = 1.0
    plus_budget: bool = False
    ceiling: bool = False


TARGETS: list[Target] = [
    Target("in order, Arrow, vs bare Flight",
           Ref("side", "lavender arrow b1024"), Ref("side", BARE), ">=", 0.8, ALL_DATA),
    Target("shuffled (block of 4 shards), vs bare Flight",
           Ref("side", "lavender arrow b1024 shuffled"), Ref("side", BARE), ">=", 0.6, ALL_DATA),
    Target("joined, aligned feature shardset, vs plain",
           Ref("side", "lavender arrow b1024 joined aligned (2 shardsets)"), Ref("side", SINGLE),
           ">=", 0.9),
    Target("filtered (keeps half), delivered rows, vs plain",
           Ref("side", "lavender arrow b1024 filtered (uid%2==0)"), Ref("side", SINGLE), ">=", 0.4),
    Target("byte_tokenize preprocessor, vs plain",
           Ref("side", "lavender arrow b1024 byte_tokenize"), Ref("side", SINGLE), ">=", 0.3),
    # workers are spawned once per job (persistent): judged on an epoch after the first
    Target("torch DataLoader 2 workers (2nd epoch) vs 0, small rows",
           Ref("side", "lavender torch loader b1024 2 workers, 2nd epoch"),
           Ref("side", "lavender torch loader b1024 0 workers"), ">=", 0.8, ceiling=True),
    Target("torch DataLoader 2 workers (2nd epoch) vs 0, CPU collate",
           Ref("loader", loader.NEXT_EPOCH), Ref("loader", loader.CASES[0]), ">", 1.3,
           ceiling=True),
    Target("batch 32 vs bare Flight batch 32",
           Ref("side", "lavender arrow b32"), Ref("side", "bare flight do_get b32"), ">=", 2.0),
    Target("first batch, shuffled",
           Ref("first", first_batch.SHUFFLED, "first_batch_s"), None, "<=", 50.0,
           unit="ms", scale=1000.0),
    Target("server RSS after the side-by-side run",
           Ref("side", None, "server_rss_after_mb"), None, "<=", 300.0, unit="MB",
           plus_budget=True),
    Target("server RSS, max over 100 iterations",
           Ref("memory", None, "max_mb"), None, "<=", 300.0, unit="MB", plus_budget=True),
    Target("server RSS flat over 100 iterations (median 11-20 -> 91-100)",
           Ref("memory", None, "growth_mb"), None, "<=", FLAT_MB, unit="MB"),
]  # fmt: skip

MET, MISSED = "met", "missed"
# where a suite's figures sit in the results (the side by side's key predates the targets)
RESULT_KEYS = {"side": "side_by_side"}


def _find(results: dict[str, Any], ref: Ref, dataset: str) -> tuple[float | None, str]:
    """The figure and, when there is none, why."""
    suite = results.get(RESULT_KEYS.get(ref.suite, ref.suite))
    if suite is None:
        return None, f"not run (--suites {ref.suite})"
    if ref.case is None:
        value = suite.get(ref.field)
        return (float(value), "") if value is not None else (None, f"no {ref.field}")
    record = _record(results, ref, dataset)
    if record is None:
        return None, f"not measured: no case {ref.case!r} ({dataset})"
    if "not_measured" in record:
        return None, f"not measured: {ref.case}: {record['not_measured']}"
    return float(record[ref.field]), ""


def _record(results: dict[str, Any], ref: Ref, dataset: str) -> dict[str, Any] | None:
    """The record of ``ref``'s case on ``dataset`` (None: not in the results)."""
    suite = results.get(RESULT_KEYS.get(ref.suite, ref.suite)) or {}
    for record in suite.get("cases", []):
        if record.get("case") == ref.case and record.get("dataset", "text") == dataset:
            return record
    return None


def _ceiling(results: dict[str, Any], target: Target, dataset: str, base: float) -> float | None:
    """The ratio the measured case's CPU allows on this machine's cores (see ``Target``)."""
    record = _record(results, target.measured, dataset)
    if record is None or not record.get("floor_s") or not base:
        return None
    return float(record["rows"]) / float(record["floor_s"]) / base


def _holds(value: float, op: str, bound: float) -> bool:
    return {">=": value >= bound, ">": value > bound, "<=": value <= bound}[op]


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target and data set: the figure, its baseline, the bound and the status."""
    rows = []
    for target in TARGETS:
        datasets = target.datasets if target.measured.case is not None else ("",)
        for dataset in datasets:
            row: dict[str, Any] = {
                "target": target.name, "dataset": dataset, "op": target.op,
                "goal": target.goal, "unit": target.unit, "plus_budget": target.plus_budget,
                "case": target.measured.case, "value": None, "measured": None,
                "baseline_case": target.baseline.case if target.baseline else None,
                "baseline": None, "bound": None, "ceiling": None,
            }  # fmt: skip
            value, why = _find(results, target.measured, dataset)
            row["value"] = value
            if value is not None and target.baseline is not None:
                base, why = _find(results, target.baseline, dataset)
                row["baseline"] = base
                if target.ceiling and base:
                    row["ceiling"] = _ceiling(results, target, dataset, base)
                value = value / base if base else None
            if value is None:
                row["status"] = why
                rows.append(row)
                continue
            value *= target.scale
            row["measured"] = value
            bound: float | None = target.goal
            if target.plus_budget:
                suite = RESULT_KEYS.get(target.measured.suite, target.measured.suite)
                budget = results[suite].get("memory_budget_mb")
                row["budget_mb"] = budget
                bound = None if budget is None else budget + target.goal
            row["bound"] = bound
            if bound is None:
                row["status"] = "n/a (no budget yet)"
            else:
                row["status"] = MET if _holds(value, target.op, bound) else MISSED
            rows.append(row)
    return rows


def failed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows ``--check`` fails on: targets missed, or whose case broke."""
    return [r for r in rows if r["status"] == MISSED or r["status"].startswith("not measured")]


def _figure(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.0f} ms"
    if unit == "MB":
        return f"{value:,.0f} MB"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def _cells(row: dict[str, Any]) -> list[str]:
    name = row["target"] + (f" [{row['dataset']}]" if row["dataset"] else "")
    sign = {">=": "≥", ">": ">", "<=": "≤"}[row["op"]]
    goal = f"{sign} " + (
        f"budget + {row['goal']:,.0f} MB"
        if row["plus_budget"]
        else _figure(row["goal"], row["unit"])
    )
    if row["plus_budget"] and row.get("bound") is not None:
        goal += f" = {row['bound']:,.0f} MB"
    measured = "-" if row["measured"] is None else _figure(row["measured"], row["unit"])
    if row["baseline_case"] is not None:
        if row["value"] is not None and row["measured"] is not None:
            measured += f" ({_rate(row['value'])}/s)"
        baseline = row["baseline_case"]
        if row["baseline"] is not None:
            baseline = f"{_rate(row['baseline'])}/s {baseline}"
    elif row["plus_budget"]:
        budget = row.get("budget_mb")
        baseline = "budget: " + ("not reported" if budget is None else f"{budget:,.0f} MB")
    else:
        baseline = "(the value itself)"
    status = row["status"]
    if row.get("ceiling") is not None:
        status += f" (this machine's ceiling: {row['ceiling']:.2f})"
    return [name, measured, baseline, goal, status]


def render(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The targets table (plain text, or Markdown)."""
    header = ["target", "measured", "of (same run)", "target", "result"]
    met = sum(r["status"] == MET for r in rows)
    missed = sum(r["status"] == MISSED for r in rows)
    title = f"Targets: {met} met, {missed} missed, {len(rows) - met - missed} not judged"
    return _block(title, [_cells(r) for r in rows], header, markdown, left=len(header))
