"""The side-by-side data sets, made by the benchmark itself (no download).

- ``text``: uid + a 100-character text (1M rows);
- ``extra-aligned``, ``extra-unaligned``: feature shardsets of ``text`` (same uids):
  ``score`` + ``label``, for the join cases. The aligned one has ``text``'s 10 shard
  boundaries and uid order (the server attaches its columns without copying); the unaligned
  one has 7 shards of rows permuted by a fixed seed (joined through the uid index);
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

from .common import shard_bounds, text_rows, write_feature_shards


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


TEXT_SHARDS = 10


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
    size = 0
    for index, (start, count) in enumerate(shard_bounds(rows, shards)):
        part = make(start, count)
        size += part.nbytes
        pq.write_table(part, folder / f"shard.{index:08d}.parquet")
    return folder, size / rows


def make_all(home: Path, quick: bool) -> dict[str, DataSet]:
    """All data sets under ``home`` (``quick``: a tenth of the rows)."""
    scale = 10 if quick else 1
    specs = [
        ("text", text_rows, 1_000_000 // scale, TEXT_SHARDS, "uid + 100-char text"),
        ("binary", binary_rows, 100_000 // scale, 10, "uid + 4 KiB binary"),
        ("tensor", tensor_rows, 1_000_000 // scale, 10, "uid + float32[32] + label"),
    ]
    out = {}
    for name, make, rows, shards, description in specs:
        folder, row_bytes = write(home / name, make, rows, shards)
        out[name] = DataSet(name, folder, rows, row_bytes, description)
    rows = out["text"].rows
    for name, shards, seed, description in (
        ("extra-aligned", TEXT_SHARDS, None, "aligned with text"),
        ("extra-unaligned", 7, 1, "7 shards, rows shuffled"),
    ):
        row_bytes = write_feature_shards(home / name, rows, shards, shuffle_seed=seed)
        description = f"uid + score + label (join side, {description})"
        out[name] = DataSet(name, home / name, rows, row_bytes, description)
    return out
