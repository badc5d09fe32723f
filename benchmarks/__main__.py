"""``python -m benchmarks run [--quick] [--peers] [--check] [--suites ...] [--memory-mb N]``.

Suites: ``side`` (side by side: the limits, Lavender Flight and, with ``--peers``, the
peers, on the same data), ``iteration`` (bare Flight vs Lavender, b32/b1024, shuffle,
arrow/python; then joined with an aligned and an unaligned feature shardset vs the single
shardset), ``preprocessing`` (a CPU-bound preprocessor, 0/1/2 workers), ``s3`` (moto
S3 vs local files), ``first`` (time to the first batch of a new iteration), ``loader`` (a
torch DataLoader whose collate does real CPU work, 0 vs 2 workers), ``memory`` (100
iterations on one server, its RSS after each), ``nodes`` (one iteration over 1, 2, 3 nodes on
PostgreSQL vs 1 on SQLite; what a claim and an ack cost on each). After them, the targets table
(``targets.py``): each target's figure, its baseline in the same run, the bound and
met / missed; ``--check`` exits 1 when one is missed. The side-by-side and targets tables
are also written as Markdown (``benchmarks/results/latest.md``, ``quick.md`` for
``--quick``), every figure as JSON, and the side-by-side drawn as a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import (
    chart,
    common,
    first_batch,
    iteration,
    loader,
    memory,
    nodes,
    s3,
    side_by_side,
    targets,
    transforms,
)

RESULTS = Path(__file__).parent / "results"
SUITES = ("side", "iteration", "preprocessing", "s3", "first", "loader", "memory", "nodes")


def machine() -> dict[str, Any]:
    """What the figures ran on."""
    cpu = ""
    memory_gib = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / 1024**2
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(memory_gib, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "commit": commit,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the benchmarks and print the tables")
    run.add_argument(
        "--quick", action="store_true", help="a tenth of the data, one repetition (CI smoke)"
    )
    run.add_argument("--out", help="write the figures as JSON here")
    run.add_argument(
        "--peers",
        action="store_true",
        help="also measure lavender-data, MosaicML streaming and LitData (installs each into "
        "its own venv under ~/.cache/lavender-flight-bench on first use)",
    )
    run.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a target is missed or its case failed (targets not run, or over a "
        "memory budget the server does not report, do not count)",
    )
    run.add_argument(
        "--memory-mb",
        type=int,
        help="start every Lavender Flight server with --memory-mb N (the memory targets are "
        "then judged against N); needs a server that has the flag",
    )
    run.add_argument(
        "--suites",
        default=",".join(SUITES),
        help=f"comma-separated, of {', '.join(SUITES)} (default: all)",
    )
    run.add_argument("--repeat", type=int, help="repetitions per case (default 3, quick 1)")
    args = parser.parse_args()
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = set(suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suites {', '.join(sorted(unknown))}; known: {', '.join(SUITES)}")
    if args.memory_mb is not None:
        if not common.server_has_flag("--memory-mb"):
            parser.error("this server has no --memory-mb flag yet; run without --memory-mb")
        common.SERVER_FLAGS[:] = ["--memory-mb", str(args.memory_mb)]
    started = time.time()
    rows = 100_000 if args.quick else 1_000_000
    repeat = args.repeat or (1 if args.quick else 3)
    command = "python -m benchmarks run " + " ".join(sys.argv[2:])
    results: dict[str, Any] = {"machine": machine(), "command": command.strip()}
    if "side" in suites:
        print(
            f"\nSide by side ({'quick, ' if args.quick else ''}median of {repeat}"
            f"{', with peers' if args.peers else ''}):",
            flush=True,
        )
        side = side_by_side.run(quick=args.quick, repeat=repeat, with_peers=args.peers)
        side_by_side.add_ratios(side)
        results["side_by_side"] = side
        print("\n" + side_by_side.render(side))
    if "iteration" in suites:
        results["iteration"] = iteration.run(rows=rows, repeat=repeat)
    if "preprocessing" in suites:
        results["preprocessing"] = transforms.run(rows=rows // 50)
    if "s3" in suites:
        results["s3"] = s3.run(rows=rows // 5, repeat=repeat)
    if "first" in suites:
        results["first"] = first_batch.run(rows=rows, repeat=max(5, repeat))
    if "loader" in suites:
        results["loader"] = loader.run(rows=rows // 2, repeat=repeat)
    if "memory" in suites:
        results["memory"] = memory.run(rows=rows)
    if "nodes" in suites:
        results["nodes"] = nodes.run(rows=rows // 5, repeat=repeat)
    results["targets"] = targets.evaluate(results)
    print("\n" + targets.render(results["targets"]))
    results["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "latest"
    out = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)  # a run of half an hour is not lost to it
    out.write_text(json.dumps(results, indent=2))
    m = results["machine"]
    title = (
        f"{m['cpus']} cores, {m['cpu_model']}, {m['memory_gib']:.0f} GiB - `{results['command']}`"
    )
    blocks = [targets.render(results["targets"], markdown=True)]
    if "side_by_side" in results:
        blocks.append(side_by_side.render(results["side_by_side"], markdown=True))
        why_not = chart.draw(
            results["side_by_side"],
            RESULTS / f"{stem}.png",
            "Lavender Flight side by side - " + title,
        )
        print(f"\nchart: {why_not or RESULTS / f'{stem}.png'}")
    (RESULTS / f"{stem}.md").write_text(title + "\n\n" + "\n\n".join(blocks) + "\n")
    print(f"figures: {out}, tables: {RESULTS / f'{stem}.md'} ({results['seconds']:.0f} s)")
    if args.check:
        broken = targets.failed(results["targets"])
        for row in broken:
            print(f"check: {row['target']} {row['dataset']}: {row['status']}".rstrip(), flush=True)
        if broken:
            return 1
        print("check: no target missed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
