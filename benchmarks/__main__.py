"""``python -m benchmarks run [--quick] [--peers] [--out results.json] [--suites ...]``.

Suites: ``side`` (side by side: the limits, Lavender Flight and, with ``--peers``, the
peers, on the same data), ``iteration`` (bare Flight vs Lavender, b32/b1024, shuffle,
arrow/python; then joined with an aligned and an unaligned feature shardset vs the single
shardset), ``preprocessing`` (a CPU-bound preprocessor, 0/1/2 workers), ``s3`` (moto
S3 vs local files). The side-by-side table is also written as Markdown and drawn as a PNG
chart under ``benchmarks/results/``.
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

from . import chart, iteration, s3, side_by_side, transforms

RESULTS = Path(__file__).parent / "results"
SUITES = ("side", "iteration", "preprocessing", "s3")


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
        help="also measure lavender-data and MosaicML streaming (installs each into its own "
        "venv under ~/.cache/lavender-flight-bench on first use)",
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
    results["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "latest"
    out = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    out.write_text(json.dumps(results, indent=2))
    if "side_by_side" in results:
        m = results["machine"]
        title = (
            f"Lavender Flight side by side - {m['cpus']} cores, {m['cpu_model']}, "
            f"{m['memory_gib']:.0f} GiB - `{results['command']}`"
        )
        (RESULTS / f"{stem}.md").write_text(
            side_by_side.render(results["side_by_side"], markdown=True) + "\n"
        )
        why_not = chart.draw(results["side_by_side"], RESULTS / f"{stem}.png", title)
        print(f"\nchart: {why_not or RESULTS / f'{stem}.png'}")
    print(f"figures: {out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
