"""Runs in litdata's own venv: ``litdata.optimize`` the Parquet rows into its chunks, then
iterate them with ``StreamingDataset`` through its ``StreamingDataLoader``; print JSON.

Argument: a JSON object with ``folder`` (Parquet), ``out`` (the chunks' folder), ``rows``,
``columns`` (name -> encoding, as for the mosaic peer: only ``ndarray...`` matters, a numpy
row; the others are Python values), ``batch_size``, ``workers`` (list), ``repeat``,
``row_bytes``. It never imports Lavender Flight. The loader gets an identity ``collate_fn``
(as the mosaic peer and our own loader do): torch's default collate would walk every string.
"""

import json
import shutil
import sys
import time

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from litdata import StreamingDataLoader, StreamingDataset, optimize
from peer_timing import report, timed_pass  # beside this script


def samples(part: list) -> object:
    """The samples of one input (a Parquet shard and how many of its rows), a dict a row."""
    path, count, columns = part
    table = pq.read_table(path).slice(0, count)
    values = {}
    for name, encoding in columns.items():
        column = table.column(name).combine_chunks()
        if encoding.startswith("ndarray"):
            values[name] = column.flatten().to_numpy().reshape(len(column), -1)
        else:
            values[name] = column.to_pylist()
    for i in range(table.num_rows):
        yield {name: values[name][i] for name in columns}


def identity(items: list) -> list:
    return items


def write(spec: dict) -> float:
    shutil.rmtree(spec["out"], ignore_errors=True)
    start = time.perf_counter()
    parts, left = [], spec["rows"]
    for path in sorted(ds.dataset(spec["folder"], format="parquet").files):
        if left > 0:
            count = min(left, pq.ParquetFile(path).metadata.num_rows)
            parts.append([path, count, spec["columns"]])
            left -= count
    optimize(
        fn=samples,
        inputs=parts,
        output_dir=spec["out"],
        chunk_bytes="64MB",
        num_workers=1,
        reorder_files=False,
        verbose=False,
    )
    return time.perf_counter() - start


def main() -> None:
    spec = json.loads(sys.argv[1])
    write_seconds = write(spec)
    out = []
    for workers in spec["workers"]:
        runs = []
        for _ in range(spec["repeat"]):
            start = time.perf_counter()
            dataset = StreamingDataset(input_dir=spec["out"], shuffle=False)
            loader = StreamingDataLoader(
                dataset,
                batch_size=spec["batch_size"],
                num_workers=workers,
                collate_fn=identity,
            )
            runs.append(timed_pass(loader, start, spec["row_bytes"]))
            del loader, dataset
        out.append({"workers": workers, "runs": runs})
    report(write_seconds, out)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
