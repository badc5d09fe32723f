"""Batch formats: what an iteration yields for ``format="python" | "numpy" | "arrow" | "torch"``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from ..protocol.errors import InvalidArgument

__all__ = [
    "FORMATS",
    "check_format",
    "convert",
    "require_torch",
    "samples",
    "split",
    "torch_missing",
]

FORMATS = ("python", "numpy", "arrow", "torch")

TORCH_EXTRA = 'pip install "lavender-flight[torch]"'
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def torch_missing(what: str) -> ImportError:
    """The error of ``what`` (a format, the DataLoader) on a machine without PyTorch."""
    return ImportError(
        f"{what} needs PyTorch, which is not installed: {TORCH_EXTRA} (on a CPU-only "
        f"machine, first: pip install torch --index-url {TORCH_CPU_INDEX})"
    )


def require_torch(what: str) -> None:
    """Import torch, or raise :func:`torch_missing`'s one-line error naming what to install.

    A torch that is installed but fails to import (a broken install) raises its own error.
    """
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "torch":
            raise torch_missing(what) from None
        raise


def check_format(fmt: str) -> str:
    """``fmt`` if it is a known batch format (``torch``: torch installed), else a clear error."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown batch format {fmt!r}; formats: {', '.join(FORMATS)}")
    if fmt == "torch":
        require_torch('format="torch"')
    return fmt


def _numpy(column: pa.Array) -> np.ndarray:
    if pa.types.is_fixed_size_list(column.type) and column.null_count == 0:
        values = _numpy(column.flatten())
        return values.reshape(len(column), column.type.list_size)
    return column.to_numpy(zero_copy_only=False)


def _python(column: pa.Array) -> list[Any]:
    """A column's values as Python objects (``to_pylist``'s).

    Strings and bytes through numpy's object array: Arrow makes them there in C++, a fifth
    faster than ``to_pylist`` (which goes through a scalar per value).
    """
    kind = column.type
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        return column.to_numpy(zero_copy_only=False).tolist()
    return column.to_pylist()


def _torch(column: pa.Array) -> Any:
    import torch

    kind = column.type
    numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    if pa.types.is_fixed_size_list(kind):
        inner = kind.value_type
        numeric = pa.types.is_integer(inner) or pa.types.is_floating(inner)
    if not numeric:
        return _python(column)
    array = _numpy(column)
    if array.dtype == object:
        return _python(column)
    with warnings.catch_warnings():
        # Arrow memory is read-only to numpy; the tensor shares it (zero copy): clone()
        # before changing it in place.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def convert(batch: pa.RecordBatch, fmt: str) -> Any:
    """A record batch in the asked format (``python``: dict of lists)."""
    if fmt == "arrow":
        return batch
    if fmt == "python":
        return batch.to_pydict()
    if fmt == "numpy":
        return {
            name: _numpy(column)
            for name, column in zip(batch.schema.names, batch.columns, strict=True)
        }
    return {
        name: _torch(column) for name, column in zip(batch.schema.names, batch.columns, strict=True)
    }


def split(message: pa.RecordBatch, sizes: list[int], fmt: str) -> Iterator[Any]:
    """The batches a message carries, in ``fmt``.

    The message is converted once, then cut into views (slices of lists, arrays or
    tensors), so small batches cost little.
    """
    if fmt == "arrow":
        offset = 0
        for rows in sizes:
            yield message.slice(offset, rows)
            offset += rows
        return
    columns = convert(message, fmt)
    offset = 0
    for rows in sizes:
        yield {name: values[offset : offset + rows] for name, values in columns.items()}
        offset += rows


def samples(batch: Any) -> Iterator[dict[str, Any]]:
    """The samples of a batch one at a time, as dicts (for ``batch_size=0``).

    An Arrow batch gives Python values (``to_pylist``: no Python per value of ours); a
    converted one (numpy, torch) gives each column's row: numpy scalars and arrays, 0-d
    and row tensors, Python values of list columns.
    """
    if isinstance(batch, pa.RecordBatch):
        yield from batch.to_pylist()
        return
    names = list(batch)
    rows = len(batch[names[0]]) if names else 0
    for index in range(rows):
        yield {name: batch[name][index] for name in names}
