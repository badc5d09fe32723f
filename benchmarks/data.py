"""The side-by-side data sets, made by the benchmark itself (no download).

- ``text``: uid + a 100-character text (1M rows);
- ``extra``: a second shardset of ``text`` (same uids, other shard sizes): ``score`` +
  ``label``, for the join case;
- ``binary``: uid + a 4 KiB binary column (100k rows);
- ``tensor``: uid + a 32-float32 vector + an int64 label (1M rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .common import text_rows


def extra_rows(start: int, count: int) -> pa.Table:
    rng = np.random.default_rng([7, start])
    return pa.table(
        {
            "uid": pa.array(np.arange(start, start + count, dtype=np.int64)),
            "score": pa.array(rng.random(count, dtype=np.float32)),
            "label": pa.array(rng.integers(0, 10, count, dtype=np.int64)),
        }
    )


def binary_rows(start: int, count: int, width: int = 4096) -> pa.Table:
    rng = np.random.default_rng([3, start])
    data = rng.integers(0, 256, size=count * width, dtype=np.uint8)
    offsets = np.arange(0, (count + 1) * width, width, dtype=np.int32)
    blob = pa.BinaryArray.from_buffers(
        pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    return pa.table(
        {"uid": pa.array(np.arange(start, start + count, dtype=np.int64)), "data": blob}
    )


def tensor_rows(start: int, count: int, dim: int = 32) -> pa.Table:
    rng = np.random.default_rng([5, start])
    values = pa.array(rng.standard_normal(count * dim, dtype=np.float32))
    return pa.table(
        {
            "uid": pa.array(np.arange(start, start + count, dtype=np.int64)),
            "x": pa.FixedSizeListArray.from_arrays(values, dim),
            "label": pa.array(rng.integers(0, 10, count, dtype=np.int64)),
        }
    )


@dataclass
class DataSet:
    """One data set on disk: a folder of Parquet shards."""

    name: str
    folder: Path
    rows: int
    row_bytes: float  # Arrow bytes per row, for MB/s
    description: str


def write(
    folder: Path, make: Callable[[int, int], pa.Table], rows: int, shards: int
) -> tuple[Path, float]:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // shards)
    size = 0
    for index in range(shards):
        start = index * per
        count = min(per, rows - start)
        if count > 0:
            part = make(start, count)
            size += part.nbytes
            pq.write_table(part, folder / f"shard.{index:08d}.parquet")
    return folder, size / rows


def make_all(home: Path, quick: bool) -> dict[str, DataSet]:
    """All data sets under ``home`` (``quick``: a tenth of the rows)."""
    scale = 10 if quick else 1
    specs = [
        ("text", text_rows, 1_000_000 // scale, 10, "uid + 100-char text"),
        ("extra", extra_rows, 1_000_000 // scale, 7, "uid + score + label (join side)"),
        ("binary", binary_rows, 100_000 // scale, 10, "uid + 4 KiB binary"),
        ("tensor", tensor_rows, 1_000_000 // scale, 10, "uid + float32[32] + label"),
    ]
    out = {}
    for name, make, rows, shards, description in specs:
        folder, row_bytes = write(home / name, make, rows, shards)
        out[name] = DataSet(name, folder, rows, row_bytes, description)
    return out
