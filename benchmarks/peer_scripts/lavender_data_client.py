"""Runs in lavender-data 0.1.10's own venv: register Parquet shards, iterate, print JSON.

Argument: a JSON object with ``url``, ``folder``, ``rows``, ``cases`` (each ``batch_size``,
``max_rows`` (optional: stop there) and ``workers``: 0 for ``LavenderDataLoader`` itself, n
for ``.to_async(num_workers=n)``), ``repeat`` and ``row_bytes``. It never imports Lavender Flight.
"""

import json
import resource
import sys
import time
from pathlib import Path

from lavender_data.client import api
from lavender_data.client.iteration import LavenderDataLoader


def main() -> None:
    spec = json.loads(sys.argv[1])
    api.init(api_url=spec["url"])
    dataset = api.create_dataset(name=f"bench-{time.time_ns()}", uid_column_name="uid")
    shardset = api.create_shardset(
        dataset_id=dataset.id, location=Path(spec["folder"]).as_uri(), columns=[]
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # the server lists and inspects shards in the background
        current = api.get_shardset(dataset.id, shardset.id)
        if current.total_samples >= spec["rows"]:
            break
        time.sleep(0.5)
    out = []
    seed = 0
    made: dict[int, float] = {}
    for case in spec["cases"]:
        runs = []
        for _ in range(spec["repeat"]):
            # the server joins a new loader to an iteration of the same config made in the
            # last 10 s (here one already consumed, which yields nothing): wait that out
            wait = made.get(case["batch_size"], 0.0) + 10.5 - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            made[case["batch_size"]] = time.monotonic()
            seed += 1
            start = time.perf_counter()
            loader = LavenderDataLoader(
                dataset_id=dataset.id,
                batch_size=case["batch_size"],
                shuffle_seed=seed,
                api_url=spec["url"],
            )
            batches = loader.to_async(num_workers=case["workers"]) if case["workers"] else loader
            rows, first = 0, 0.0
            for batch in batches:
                if not rows:
                    first = time.perf_counter() - start
                rows += len(batch["uid"])
                if rows >= case.get("max_rows", float("inf")):
                    break
            seconds = time.perf_counter() - start
            runs.append(
                {
                    "rows": rows,
                    "bytes": rows * spec["row_bytes"],
                    "seconds": seconds,
                    "first": first,
                }
            )
        out.append({"case": case, "runs": runs})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cases": out, "client_rss_mb": rss}), flush=True)


if __name__ == "__main__":
    main()
