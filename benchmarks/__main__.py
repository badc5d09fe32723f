"""``python -m benchmarks run [--quick] [--out results.json]``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from . import iteration, s3, transforms


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the benchmarks and print the tables")
    run.add_argument("--quick", action="store_true", help="small data, one repetition (CI smoke)")
    run.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    started = time.time()
    rows, repeat = (100_000, 1) if args.quick else (1_000_000, 3)
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "iteration": iteration.run(rows=rows, repeat=repeat),
        "preprocessing": transforms.run(rows=rows // 50),
        "s3": s3.run(rows=rows // 5, repeat=repeat),
    }
    results["seconds"] = round(time.time() - started, 1)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
