"""Side by side: the limits, Lavender Flight and the peers, on the same data in one run.

Every case runs in a fresh client process (``benchmarks.case``) against servers in their own
processes; the client's peak RSS is its ``ru_maxrss``, the server's is the peak of its
process tree's RSS (``/proc``) sampled while the case runs; the server's RSS once every
case has run is kept as ``server_rss_after_mb`` (with its ``memory_budget_mb``, if it
reports one). The cases of the limits and of Lavender Flight run in rounds, each once a
round (``Runner.rounds``), so that a ratio's two sides see the machine alike. Figures are
medians over the rounds (each run after a warm-up run in its process); ratios are
against the bare Flight do_get (batch 1024) and the Parquet scan of the same data set, and,
for the joined cases (``text`` + an aligned or an unaligned feature shardset, each its own
dataset over the same ``text`` shards), against the single-shardset ``lavender arrow b1024``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavender_flight.client import api as lavender

from . import peers
from .common import (
    ROOT,
    PeakSampler,
    bare_server,
    lavender_server,
    memory_budget_mb,
    table,
    tree_rss_mb,
)
from .cpu import cores, epoch_floor_s
from .data import DataSet, make_all

BATCH = 1024
SINGLE = "lavender arrow b1024"
# the joined cases: which feature data set joins ``text`` in each
JOINS = {
    "lavender arrow b1024 joined aligned (2 shardsets)": "extra-aligned",
    "lavender arrow b1024 joined unaligned (2 shardsets)": "extra-unaligned",
}


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Medians of samples/s, MB/s and time to first batch over repetitions."""
    startup = [r["startup"] for r in runs if "startup" in r]  # epochs before the measured one
    return {
        **({"startup_s": statistics.median(startup)} if startup else {}),
        **cpu_medians(runs),
        "samples_per_s": statistics.median(r["rows"] / r["seconds"] for r in runs),
        "mb_per_s": statistics.median(r["bytes"] / r["seconds"] / 1e6 for r in runs),
        "first_batch_s": statistics.median(r["first"] for r in runs),
        "rows": int(runs[-1]["rows"]),
        "runs_samples_per_s": [r["rows"] / r["seconds"] for r in runs],
        "runs_first_s": [r["first"] for r in runs],
        "runs_last_s": [r.get("last") for r in runs],
        "runs_seconds": [r["seconds"] for r in runs],
    }


CPU_PARTS = ("client", "loop_thread", "workers", "server")


def cpu_medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of what each process spent on a run (``cpu_s``), and of its floor.

    ``floor_s``: the least time the run could take on this machine's cores, had it cost
    what it did (:func:`benchmarks.cpu.epoch_floor_s`, per run, then the median).
    """
    measured = [r["cpu"] for r in runs if r.get("cpu")]
    if not measured:
        return {}
    medians: dict[str, float | None] = {}
    for part in CPU_PARTS:
        values = [m[part] for m in measured if m.get(part) is not None]
        medians[part] = statistics.median(values) if len(values) == len(measured) else None
    count = cores()
    floors = [epoch_floor_s(m, count) for m in measured]
    known = [f for f in floors if f is not None]
    return {
        "cpu_s": medians,
        "cores": count,
        "floor_s": statistics.median(known) if len(known) == len(floors) else None,
    }


@dataclass
class Planned:
    """A case to run: its data set, group, name, spec and the server whose RSS is sampled."""

    data: DataSet
    group: str
    name: str
    spec: dict[str, Any]
    server_pid: int | None
    first_only: bool = False


class Runner:
    """Runs cases and collects their records."""

    def __init__(self, repeat: int, warmup: int) -> None:
        self.repeat = repeat
        self.warmup = warmup
        self.records: list[dict[str, Any]] = []

    def case(
        self,
        data: DataSet,
        group: str,
        name: str,
        spec: dict[str, Any],
        server_pid: int | None,
        first_only: bool = False,
    ) -> None:
        """Run one case in a fresh client process (``first_only``: it times the first batch)."""
        planned = Planned(data, group, name, spec, server_pid, first_only)
        self.add(self._record(planned, [self._once(planned, self.repeat)]))

    def rounds(self, cases: list[Planned]) -> None:
        """Run every case once a round, ``repeat`` rounds (each run a fresh client process).

        A ratio's two cases are then measured minutes apart at most, in every round alike:
        on a shared machine, whose speed drifts by tens of percent over a run, running one
        case's repetitions back to back and the other's ten minutes later measured the drift.
        """
        outs: list[list[dict[str, Any]]] = [[] for _ in cases]
        for number in range(self.repeat):
            print(f"  round {number + 1} of {self.repeat}", flush=True)
            for planned, found in zip(cases, outs, strict=True):
                if not found or "failed" not in found[-1]:
                    found.append(self._once(planned, 1))
        for planned, found in zip(cases, outs, strict=True):
            self.add(self._record(planned, found))

    def _once(self, planned: Planned, repeat: int) -> dict[str, Any]:
        """One client process running the case ``repeat`` times (after its warm-up)."""
        spec = {"repeat": repeat, "warmup": self.warmup, "row_bytes": planned.data.row_bytes,
                "server_pid": planned.server_pid, **planned.spec}  # fmt: skip
        with PeakSampler(planned.server_pid) as sampler:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.case", json.dumps(spec)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=1200,
            )
        if done.returncode:
            tail = " | ".join(done.stderr.strip().splitlines()[-2:])
            return {"failed": f"case failed: {tail}"}
        out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        out["server_rss_mb"] = sampler.peak if planned.server_pid else None
        return out

    @staticmethod
    def _record(planned: Planned, outs: list[dict[str, Any]]) -> dict[str, Any]:
        """A case's record from its processes' outputs (medians over all their runs)."""
        record: dict[str, Any] = {"dataset": planned.data.name, "group": planned.group,
                                  "case": planned.name}  # fmt: skip
        if planned.first_only:
            record["first_only"] = True
        failed = [out["failed"] for out in outs if "failed" in out]
        if failed:
            record["not_measured"] = failed[0]
            return record
        record.update(summarize([run for out in outs for run in out["runs"]]))
        record["client_rss_mb"] = max(out["client_rss_mb"] for out in outs)
        workers = [out["workers_rss_mb"] for out in outs if out.get("workers_rss_mb") is not None]
        record["workers_rss_mb"] = max(workers) if workers else None
        peaks = [out["server_rss_mb"] for out in outs if out["server_rss_mb"] is not None]
        record["server_rss_mb"] = max(peaks) if peaks else None
        return record

    def add(self, record: dict[str, Any]) -> None:
        if record.get("rows") == 0:
            record = {k: record[k] for k in ("dataset", "group", "case")}
            record["not_measured"] = "it delivered no rows"
        self.records.append(record)
        if "not_measured" in record:
            print(f"  {record['dataset']:6} {record['case']:51} not measured", flush=True)
        elif record.get("first_only"):
            print(
                f"  {record['dataset']:6} {record['case']:51} "
                f"first {record['first_batch_s']:.3f} s (median of {len(record['runs_first_s'])})",
                flush=True,
            )
        else:
            print(
                f"  {record['dataset']:6} {record['case']:51} "
                f"{record['samples_per_s']:>14,.0f} samples/s  "
                f"first {record['first_batch_s']:.3f} s",
                flush=True,
            )


LOADER_NEXT_EPOCH = "lavender torch loader b1024 2 workers, 2nd epoch"
"""The second epoch of one loader: its persistent workers already up (a job's every epoch
but the first)."""


def _lavender_cases(data: DataSet, ids: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    base = {"kind": "lavender", "dataset_id": ids["dataset"], "batch_size": BATCH}
    only = [ids["main"]]
    cases: list[tuple[str, dict[str, Any]]] = [
        (SINGLE, {**base, "shardsets": only}),
        ("lavender arrow b1024 shuffled", {**base, "shardsets": only, "shuffle": True}),
    ]
    if data.name == "text":
        cases += [
            ("lavender arrow b32", {**base, "shardsets": only, "batch_size": 32}),
            *((name, {**base, "dataset_id": ids[feature], "shardsets": None})
              for name, feature in JOINS.items()),
            (
                "lavender arrow b1024 filtered (uid%2==0)",
                {**base, "shardsets": only,
                 "filters": [{"name": "expression", "params": {"expr": "uid % 2 == 0"}}]},
            ),
            (
                "lavender arrow b1024 byte_tokenize",
                {**base, "shardsets": only, "preprocessors": [{"name": "byte_tokenize"}]},
            ),
            ("lavender python b32", {**base, "shardsets": only, "batch_size": 32,
                                     "format": "python"}),
        ]  # fmt: skip
    cases += [
        ("lavender python b1024", {**base, "shardsets": only, "format": "python"}),
        ("lavender torch loader b1024 0 workers",
         {**base, "shardsets": only, "format": "torch", "loader_workers": 0}),
        ("lavender torch loader b1024 2 workers",
         {**base, "shardsets": only, "format": "torch", "loader_workers": 2}),
        (LOADER_NEXT_EPOCH,
         {**base, "shardsets": only, "format": "torch", "loader_workers": 2,
          "loader_epochs": 2}),
    ]  # fmt: skip
    return cases


MDS_COLUMNS = {
    "text": {"uid": "int64", "text": "str"},
    "binary": {"uid": "int64", "data": "bytes"},
    "tensor": {"uid": "int64", "x": "ndarray:float32:32", "label": "int64"},
}


# (venv name, client script, case label, what its write step is called)
CHUNKED_PEERS = [
    ("mosaicml-streaming", "mosaic_client.py", "mosaic streaming", "MDS write"),
    ("litdata", "litdata_client.py", "litdata streaming", "litdata.optimize"),
]


def _not_measured(data: DataSet, name: str, reason: str) -> dict[str, Any]:
    return {"dataset": data.name, "group": "peer", "case": name, "not_measured": reason}


def _peer_records(runner: Runner, home: Path, sets: dict[str, DataSet], quick: bool) -> None:
    scale = 10 if quick else 1
    # lavender-data: its server + LavenderDataLoader, text rows only (it runs at 10^2-10^3
    # rows/s, so it gets the first rows of the same data, not all of them)
    text = sets["text"]
    names = ["lavender-data b32", "lavender-data b1024", "lavender-data b1024 async 2 workers"]
    try:
        python = peers.venv_python("lavender-data")
        rows = 20_000 // scale
        folder = peers.subset(text.folder, rows, home / "peer-ld-text")
        server = peers.lavender_data_server(python, home / "peer-ld-home")
        try:
            cases = [
                {"batch_size": 32, "workers": 0, "max_rows": 1024 // scale},
                {"batch_size": 1024, "workers": 0},
                {"batch_size": 1024, "workers": 2},
            ]
            with PeakSampler(server.process.pid) as sampler:
                out = peers.run_lavender_data(
                    python, server, folder, rows, cases, runner.repeat, text.row_bytes
                )
            for name, result in zip(names, out["cases"], strict=True):
                runner.add({
                    "dataset": "text", "group": "peer", "case": name,
                    **summarize(result["runs"]),
                    "client_rss_mb": out["client_rss_mb"], "workers_rss_mb": None,
                    "server_rss_mb": sampler.peak,
                    "note": f"first {rows:,} rows of the same data",
                })  # fmt: skip
        finally:
            server.stop()
    except (peers.PeerError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        for name in names:
            runner.add(_not_measured(text, name, str(exc)[:300]))
    # the chunked peers: each converts the rows into its own chunks, then streams them
    # through a torch DataLoader with 0 and 2 workers
    caps = {"text": 200_000, "binary": 20_000, "tensor": 200_000}
    for peer, script, label, writer in CHUNKED_PEERS:
        for data_name, columns in MDS_COLUMNS.items():
            data = sets[data_name]
            names = [f"{label} {w} workers" for w in (0, 2)]
            try:
                python = peers.venv_python(peer)
                rows = min(caps[data_name] // scale, data.rows)
                out = peers.run_chunked(
                    script, python, data.folder, home / f"{peer}-{data_name}", rows, columns,
                    BATCH, [0, 2], runner.repeat, data.row_bytes,
                )  # fmt: skip
                for name, result in zip(names, out["cases"], strict=True):
                    runner.add({
                        "dataset": data_name, "group": "peer", "case": name,
                        **summarize(result["runs"]),
                        "client_rss_mb": out["client_rss_mb"],
                        "workers_rss_mb": out["workers_rss_mb"], "server_rss_mb": None,
                        "note": f"first {rows:,} rows; {writer} {out['write_seconds']:.1f} s",
                    })  # fmt: skip
            except (peers.PeerError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
                for name in names:
                    runner.add(_not_measured(data, name, str(exc)[:300]))


def run(quick: bool, repeat: int, with_peers: bool) -> dict[str, Any]:
    """All cases; prints progress and returns the records and the data sets."""
    runner = Runner(repeat=repeat, warmup=1)
    with tempfile.TemporaryDirectory(prefix="lf-bench-sbs-") as tmp:
        home = Path(tmp)
        started = time.time()
        sets = make_all(home, quick)
        print(f"  data written in {time.time() - started:.0f} s", flush=True)
        with lavender_server(home / "server") as server:
            lavender.init(server.url)
            ids: dict[str, dict[str, Any]] = {}
            for name in ("text", "binary", "tensor"):
                dataset = lavender.create_dataset(f"bench-{name}")
                main = lavender.create_shardset(dataset.id, sets[name].folder.as_uri())
                ids[name] = {"dataset": dataset.id, "main": main.id}
            for feature in JOINS.values():
                # its own dataset: the same text shards as main + one feature shardset
                dataset = lavender.create_dataset(f"bench-text-{feature}")
                lavender.create_shardset(dataset.id, sets["text"].folder.as_uri(), is_main=True)
                lavender.create_shardset(dataset.id, sets[feature].folder.as_uri())
                ids["text"][feature] = dataset.id
            # every case once a round (see Runner.rounds): the bare servers stay up beside
            # ours, idle while the others' cases run
            planned: list[Planned] = []
            with ExitStack() as bares:
                for name in ("text", "binary", "tensor"):
                    data = sets[name]
                    bare = bares.enter_context(bare_server(data.folder))
                    for batch in (1024, 32) if name == "text" else (1024,):
                        planned.append(Planned(
                            data, "limit", f"bare flight do_get b{batch}",
                            {"kind": "bare", "url": bare.url, "batch_size": batch},
                            bare.process.pid,
                        ))  # fmt: skip
                    planned.append(Planned(
                        data, "limit", "parquet scan (pyarrow, 1 thread)",
                        {"kind": "parquet", "folder": str(data.folder), "batch_size": BATCH},
                        None,
                    ))  # fmt: skip
                    for case_name, spec in _lavender_cases(data, ids[name]):
                        spec = {**spec, "url": server.url}
                        planned.append(
                            Planned(data, "lavender", case_name, spec, server.process.pid)
                        )
                runner.rounds(planned)
            # what the server holds once every case has run (caches, pools, idle iterations)
            after = {
                "server_rss_after_mb": tree_rss_mb(server.process.pid),
                "memory_budget_mb": memory_budget_mb(server, wait=0),
            }
            budget = after["memory_budget_mb"]
            print(
                f"  server RSS after the cases: {after['server_rss_after_mb']:,.0f} MB "
                f"(memory budget: {'not reported' if budget is None else f'{budget:,.0f} MB'})",
                flush=True,
            )
        if with_peers:
            _peer_records(runner, home, sets, quick)
        else:
            for data in (sets["text"], sets["binary"], sets["tensor"]):
                runner.add(_not_measured(data, "peers", "not asked (run with --peers)"))
        return {
            "datasets": {
                name: {"rows": d.rows, "row_bytes": d.row_bytes, "description": d.description}
                for name, d in sets.items()
            },
            "repeat": repeat,
            "cases": runner.records,
            **after,
        }


# which Lavender Flight case a peer case is compared with
EQUIVALENT = {
    "lavender-data b32": "lavender python b32",
    "lavender-data b1024": "lavender python b1024",
    "lavender-data b1024 async 2 workers": "lavender torch loader b1024 2 workers",
    "mosaic streaming 0 workers": "lavender torch loader b1024 0 workers",
    "mosaic streaming 2 workers": "lavender torch loader b1024 2 workers",
    "litdata streaming 0 workers": "lavender torch loader b1024 0 workers",
    "litdata streaming 2 workers": "lavender torch loader b1024 2 workers",
}


def add_ratios(results: dict[str, Any]) -> None:
    """``vs_bare``/``vs_parquet`` on every case, ``lavender_over_peer`` on peer cases.

    Joined cases also get ``vs_single``: over the single-shardset ``lavender arrow b1024``.
    """
    by = {(r["dataset"], r["case"]): r for r in results["cases"] if "samples_per_s" in r}
    for record in results["cases"]:
        if "samples_per_s" not in record:
            continue
        for key, limit in (
            ("vs_bare", "bare flight do_get b1024"),
            ("vs_parquet", "parquet scan (pyarrow, 1 thread)"),
        ):
            ref = by.get((record["dataset"], limit))
            record[key] = record["samples_per_s"] / ref["samples_per_s"] if ref else None
        single = by.get((record["dataset"], SINGLE))
        if record["case"] in JOINS and single:
            record["single_samples_per_s"] = single["samples_per_s"]
            record["vs_single"] = record["samples_per_s"] / single["samples_per_s"]
        ours = by.get((record["dataset"], EQUIVALENT.get(record["case"], "")))
        if record["group"] == "peer" and ours:
            record["compared_with"] = ours["case"]
            record["lavender_over_peer"] = ours["samples_per_s"] / record["samples_per_s"]


def _rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def render(results: dict[str, Any], markdown: bool = False) -> str:
    """The tables, one per data set (plain text, or Markdown for the README)."""
    header = [
        "case", "samples/s", "MB/s", "first batch", "server RSS MB", "client RSS MB",
        "vs bare Flight", "vs Parquet", "Lavender ÷ peer",
    ]  # fmt: skip
    blocks = []
    for name, info in results["datasets"].items():
        rows = []
        for r in (r for r in results["cases"] if r["dataset"] == name):
            if "not_measured" in r:
                rows.append([r["case"], f"not measured: {r['not_measured']}"] + [""] * 7)
                continue
            client = _mb(r.get("client_rss_mb"))
            if r.get("workers_rss_mb"):
                client += f" (+{r['workers_rss_mb']:.0f})"
            peer = ""
            if "lavender_over_peer" in r:
                peer = f"{r['lavender_over_peer']:,.1f}x vs {r['compared_with']}"
            rows.append([
                r["case"] + (f" [{r['note']}]" if r.get("note") else ""),
                _rate(r["samples_per_s"]), f"{r['mb_per_s']:.0f}",
                f"{r['first_batch_s'] * 1000:.0f} ms", _mb(r.get("server_rss_mb")), client,
                _ratio(r.get("vs_bare")), _ratio(r.get("vs_parquet")), peer,
            ])  # fmt: skip
        if not rows:
            continue
        title = f"{name}: {info['rows']:,} rows of {info['description']}"
        blocks.append(_block(title, rows, header, markdown))
    joined = [
        [f"{r['dataset']}: {r['case']}", _rate(r["samples_per_s"]),
         _rate(r["single_samples_per_s"]), _ratio(r["vs_single"])]
        for r in results["cases"] if "vs_single" in r
    ]  # fmt: skip
    if joined:
        header = ["case", "samples/s", f"single shardset ({SINGLE})", "joined ÷ single"]
        blocks.append(_block("joins vs the single shardset", joined, header, markdown))
    spent = [_cpu_cells(r) for r in results["cases"] if r.get("cpu_s")]
    if spent:
        cores = next(r["cores"] for r in results["cases"] if r.get("cpu_s"))
        header = ["case", "run s", "client CPU s (loop thread)", "workers CPU s",
                  "server CPU s", f"floor on {cores} cores s"]  # fmt: skip
        title = (
            "what a run cost: CPU seconds of each process (medians), and the least time "
            "that CPU can take here"
        )
        blocks.append(_block(title, spent, header, markdown))
    return "\n\n".join(blocks)


def _cpu_cells(record: dict[str, Any]) -> list[str]:
    spent = record["cpu_s"]

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return [
        f"{record['dataset']}: {record['case']}",
        seconds(statistics.median(record["runs_seconds"])),
        f"{seconds(spent['client'])} ({seconds(spent['loop_thread'])})",
        seconds(spent["workers"]),
        seconds(spent["server"]),
        seconds(record.get("floor_s")),
    ]


def _block(
    title: str, rows: list[list[str]], header: list[str], markdown: bool, left: int = 1
) -> str:
    if not markdown:
        return title + "\n" + table(rows, header, left)
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
