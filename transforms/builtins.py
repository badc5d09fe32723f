"""Built-in plugins: range, sample and expression filters; the Arrow collater; byte tokens."""

from __future__ import annotations

import ast
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..protocol.errors import InvalidArgument
from .base import Collater, Filter, Preprocessor

__all__ = ["ArrowCollater", "ByteTokenizer", "ExpressionFilter", "RangeFilter", "SampleFilter"]


class RangeFilter(Filter, name="range"):
    """Keeps rows whose ``column`` lies within ``[min, max]`` (either bound optional)."""

    def filter_batch(  # type: ignore[override]
        self,
        batch: pa.RecordBatch,
        *,
        column: str,
        min: float | None = None,
        max: float | None = None,
        inclusive: bool = True,
    ) -> pa.BooleanArray:
        """The mask of rows within the range (nulls are dropped)."""
        values = batch.column(column)
        keep = pa.array(np.ones(batch.num_rows, dtype=bool))
        if min is not None:
            keep = pc.and_(keep, (pc.greater_equal if inclusive else pc.greater)(values, min))
        if max is not None:
            keep = pc.and_(keep, (pc.less_equal if inclusive else pc.less)(values, max))
        return pc.fill_null(keep, False)


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64: a fast, well-spread hash of 64-bit integers."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class SampleFilter(Filter, name="sample"):
    """Keeps a deterministic ``rate`` of the samples, chosen by a hash of ``column`` and ``seed``.

    The same sample is kept in every epoch and on every server; a new seed picks another set.
    """

    def filter_batch(  # type: ignore[override]
        self, batch: pa.RecordBatch, *, rate: float = 0.1, seed: int = 0, column: str = "uid"
    ) -> pa.BooleanArray:
        """The mask of kept rows."""
        if not 0.0 <= rate <= 1.0:
            raise InvalidArgument(f"sample rate must be within 0..1, got {rate}")
        values = batch.column(column)
        if pa.types.is_integer(values.type):
            keys = values.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
        else:  # strings: hashed once each
            keys = np.array(
                [
                    int.from_bytes(
                        hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little"
                    )
                    for v in values.to_pylist()
                ],
                dtype=np.uint64,
            )
        hashed = _mix(keys ^ _mix(np.array([seed], dtype=np.uint64))[0])
        return pa.array(hashed < np.uint64(int(rate * 2**64 - 1)))


_COMPARE = {
    ast.Eq: pc.equal,
    ast.NotEq: pc.not_equal,
    ast.Lt: pc.less,
    ast.LtE: pc.less_equal,
    ast.Gt: pc.greater,
    ast.GtE: pc.greater_equal,
}


def _evaluate(node: ast.AST, batch: pa.RecordBatch) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, batch)
    if isinstance(node, ast.BoolOp):
        combine = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
        result = _evaluate(node.values[0], batch)
        for value in node.values[1:]:
            result = combine(result, _evaluate(value, batch))
        return result
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return pc.invert(_evaluate(node.operand, batch))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return pc.negate(_evaluate(node.operand, batch))
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, batch)
        result = None
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, (ast.In, ast.NotIn)):
                options = ast.literal_eval(right_node)
                part = pc.is_in(left, value_set=pa.array(list(options)))
                if isinstance(op, ast.NotIn):
                    part = pc.invert(part)
                right = None
            elif type(op) in _COMPARE:
                right = _evaluate(right_node, batch)
                part = _COMPARE[type(op)](left, right)
            else:
                raise InvalidArgument(f"operator {type(op).__name__} is not supported")
            result = part if result is None else pc.and_kleene(result, part)
            if right is not None:
                left = right
        return result
    if isinstance(node, ast.BinOp):
        ops = {ast.Add: pc.add, ast.Sub: pc.subtract, ast.Mult: pc.multiply, ast.Div: pc.divide,
               ast.Mod: _mod}  # fmt: skip
        if type(node.op) not in ops:
            raise InvalidArgument(f"operator {type(node.op).__name__} is not supported")
        return ops[type(node.op)](_evaluate(node.left, batch), _evaluate(node.right, batch))
    if isinstance(node, ast.Name):
        if node.id not in batch.schema.names:
            raise InvalidArgument(
                f"expression names unknown column {node.id!r}; columns: "
                f"{', '.join(batch.schema.names)}"
            )
        return batch.column(node.id)
    if isinstance(node, ast.Constant):
        return node.value
    raise InvalidArgument(f"{type(node).__name__} is not supported in a filter expression")


def _mod(left: Any, right: Any) -> Any:
    return pc.subtract(
        left, pc.multiply(pc.floor(pc.divide(pc.cast(left, pa.float64()), right)), right)
    )


class ExpressionFilter(Filter, name="expression"):
    """Keeps rows where an expression over columns is true, evaluated with Arrow compute.

    E.g. ``"label >= 3 and score < 0.5"``, ``"lang in ['en', 'fr'] and not flagged"``,
    ``"uid % 10 == 0"``. Comparisons, ``and``/``or``/``not``, ``in``, ``+ - * / %``.
    """

    def filter_batch(self, batch: pa.RecordBatch, *, expr: str) -> pa.BooleanArray:  # type: ignore[override]
        """The mask of rows where ``expr`` holds (null counts as false)."""
        try:
            tree = ast.parse(expr, mode="eval")
        except SyntaxError as exc:
            raise InvalidArgument(f"cannot parse filter expression {expr!r}: {exc.msg}") from None
        result = _evaluate(tree, batch)
        if not isinstance(result, (pa.Array, pa.ChunkedArray)):
            return pa.array(np.full(batch.num_rows, bool(result)))
        return pc.fill_null(result, False)


class ArrowCollater(Collater, name="arrow"):
    """The default: the batch's rows as they are, as one Arrow record batch (zero copy)."""

    def collate_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:  # type: ignore[override]
        """The batch unchanged."""
        return batch


class ByteTokenizer(Preprocessor, name="byte_tokenize"):
    """UTF-8 bytes of a text column as fixed-length token ids, ready for a byte-level model.

    Adds ``{output}`` (``max_length`` int32 ids: byte + ``offset``, ``pad_id`` after the end)
    and ``{output}_mask`` (1 for tokens, 0 for padding); ``drop`` removes the text column.
    """

    def process(  # type: ignore[override]
        self,
        batch: pa.RecordBatch,
        *,
        column: str = "text",
        max_length: int = 128,
        output: str = "input_ids",
        offset: int = 3,
        pad_id: int = 0,
        drop: bool = False,
    ) -> pa.RecordBatch:
        """The batch with token ids and mask columns."""
        text = batch.column(column)
        if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
            raise InvalidArgument(f"byte_tokenize needs a string column, {column!r} is {text.type}")
        text = pc.cast(pc.fill_null(text, ""), pa.large_string())
        if isinstance(text, pa.ChunkedArray):
            text = text.combine_chunks()
        _, offsets_buffer, data_buffer = text.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[
            text.offset : text.offset + len(text) + 1
        ]
        data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer else np.zeros(1, np.uint8)
        starts, lengths = offsets[:-1], np.minimum(np.diff(offsets), max_length)
        columns = np.arange(max_length)
        mask = columns[None, :] < lengths[:, None]
        positions = np.where(mask, starts[:, None] + columns[None, :], 0)
        ids = np.where(
            mask, data[positions].astype(np.int32) + offset if len(data) else pad_id, pad_id
        )
        flat = pa.array(ids.astype(np.int32).ravel())
        arrays = [
            batch.column(i)
            for i in range(batch.num_columns)
            if not (drop and batch.schema.names[i] == column)
        ]
        names = [n for n in batch.schema.names if not (drop and n == column)]
        arrays += [
            pa.FixedSizeListArray.from_arrays(flat, max_length),
            pa.FixedSizeListArray.from_arrays(pa.array(mask.astype(np.int8).ravel()), max_length),
        ]
        names += [output, f"{output}_mask"]
        return pa.RecordBatch.from_arrays(arrays, names=names)
