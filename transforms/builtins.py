"""Built-in plugins: filters (range, sample, expression), collater, tokenizer, categorizer."""

from __future__ import annotations

import ast
import functools
import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..protocol.errors import InvalidArgument
from .base import Categorizer, Collater, Filter, Preprocessor

__all__ = [
    "ArrowCollater",
    "BucketCategorizer",
    "ByteTokenizer",
    "ExpressionFilter",
    "RangeFilter",
    "SampleFilter",
]

MAX_EXPRESSION_CHARS = 10_000
"""The longest filter expression (an ``in [...]`` list of ids fits in it)."""
MAX_TOKENS = 1 << 20
"""The longest ``byte_tokenize`` output."""
MAX_EXPRESSION_TERMS = 500
"""The most terms (column names, values, operations) of a filter expression: each costs
an Arrow kernel call per batch."""


def _column(schema: pa.Schema, column: str, what: str) -> pa.DataType:
    """The type of a column the plugin names, or an error listing the columns."""
    if column not in schema.names:
        raise InvalidArgument(
            f"{what} names unknown column {column!r}; columns: {', '.join(schema.names)}"
        )
    return schema.field(column).type


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


class RangeFilter(Filter, name="range"):
    """Keeps rows whose ``column`` lies within ``[min, max]`` (either bound optional)."""

    @classmethod
    def check_schema(cls, params: dict[str, Any], schema: pa.Schema) -> pa.Schema:
        """The column exists and holds numbers."""
        kind = _column(schema, params["column"], "range")
        if not _numeric(kind):
            raise InvalidArgument(
                f"range needs a numeric column, {params['column']!r} is {kind}; use "
                "'expression' for other comparisons"
            )
        return schema

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

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """The rate is a share."""
        if not 0.0 <= params["rate"] <= 1.0:
            raise InvalidArgument(f"sample rate must be within 0..1, got {params['rate']}")

    @classmethod
    def check_schema(cls, params: dict[str, Any], schema: pa.Schema) -> pa.Schema:
        """The column exists."""
        _column(schema, params["column"], "sample")
        return schema

    def filter_batch(  # type: ignore[override]
        self, batch: pa.RecordBatch, *, rate: float = 0.1, seed: int = 0, column: str = "uid"
    ) -> pa.BooleanArray:
        """The mask of kept rows."""
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
_ARITHMETIC: dict[type[ast.operator], Any] = {
    ast.Add: pc.add,
    ast.Sub: pc.subtract,
    ast.Mult: pc.multiply,
    ast.Div: pc.divide,
    ast.Mod: lambda left, right: _mod(left, right),
}


@dataclass(frozen=True)
class _Expression:
    """A parsed filter expression: its tree, the columns it names, the value sets of ``in``."""

    tree: ast.Expression
    columns: tuple[str, ...]
    options: dict[int, pa.Array]
    """The values of each ``in`` list, by the id of its node."""


def _parse(expr: str) -> _Expression:
    """Parse and bound an expression; every construct it uses is supported."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise InvalidArgument(
            f"filter expression is {len(expr)} characters long; the limit is "
            f"{MAX_EXPRESSION_CHARS}: write a custom filter for larger conditions"
        )
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise InvalidArgument(
            f"cannot parse filter expression {expr!r:.200}: {exc.msg}"
            + (f" at column {exc.offset}" if exc.offset else "")
        ) from None
    except (ValueError, MemoryError, RecursionError) as exc:  # null bytes, deep nesting
        raise InvalidArgument(f"cannot parse filter expression {expr!r:.200}: {exc}") from None
    terms = 0
    columns: list[str] = []
    options: dict[int, pa.Array] = {}
    pending: list[ast.AST] = [tree.body]
    while pending:
        node = pending.pop()
        terms += 1
        if terms > MAX_EXPRESSION_TERMS:
            raise InvalidArgument(
                f"filter expression has more than {MAX_EXPRESSION_TERMS} terms (column "
                "names, values and operations): write a custom filter for larger conditions"
            )
        if isinstance(node, ast.BoolOp):
            pending.extend(node.values)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            pending.append(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            pending.extend((node.left, node.right))
        elif isinstance(node, ast.Compare):
            pending.append(node.left)
            for op, right in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, (ast.In, ast.NotIn)):
                    options[id(right)] = _value_set(right)
                elif type(op) in _COMPARE:
                    pending.append(right)
                else:
                    raise InvalidArgument(
                        f"operator {type(op).__name__} is not supported in a filter expression"
                    )
        elif isinstance(node, ast.Name):
            if node.id not in columns:
                columns.append(node.id)
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (bool, int, float, str)):
                raise InvalidArgument(
                    f"the value {node.value!r:.40} is not supported in a filter expression: use "
                    "numbers, strings, True or False"
                )
        else:
            what = type(getattr(node, "op", node)).__name__
            raise InvalidArgument(
                f"{what} is not supported in a filter expression: use comparisons, and/or/not, "
                "in [...], + - * / %, column names and values"
            )
    return _Expression(tree, tuple(columns), options)


def _value_set(node: ast.AST) -> pa.Array:
    try:
        values = ast.literal_eval(node)
        if not isinstance(values, (list, tuple, set)):
            raise ValueError("not a list")
        return pa.array(list(values))
    except (ValueError, TypeError, SyntaxError, pa.ArrowException):
        raise InvalidArgument(
            "the right side of 'in' in a filter expression must be a list of values of one "
            "type, e.g. lang in ['en', 'fr']"
        ) from None


def _evaluate(node: ast.AST, batch: pa.RecordBatch, parsed: _Expression) -> Any:
    if isinstance(node, ast.BoolOp):
        combine = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
        result = _evaluate(node.values[0], batch, parsed)
        for value in node.values[1:]:
            result = combine(result, _evaluate(value, batch, parsed))
        return result
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, batch, parsed)
        return pc.invert(operand) if isinstance(node.op, ast.Not) else pc.negate(operand)
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, batch, parsed)
        result = None
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = None
            if isinstance(op, (ast.In, ast.NotIn)):
                part = pc.is_in(left, value_set=parsed.options[id(right_node)])
                if isinstance(op, ast.NotIn):
                    part = pc.invert(part)
            else:
                right = _evaluate(right_node, batch, parsed)
                part = _COMPARE[type(op)](left, right)
            result = part if result is None else pc.and_kleene(result, part)
            if right is not None:
                left = right
        return result
    if isinstance(node, ast.BinOp):
        return _ARITHMETIC[type(node.op)](
            _evaluate(node.left, batch, parsed), _evaluate(node.right, batch, parsed)
        )
    if isinstance(node, ast.Name):
        _column(batch.schema, node.id, "expression")  # the schema hook was not run: say it
        return batch.column(node.id)
    assert isinstance(node, ast.Constant)
    return node.value


def _mod(left: Any, right: Any) -> Any:
    """``left % right`` as Python has it (the sign of ``right``), exact for integers.

    A zero modulus gives null there (the row is not kept) rather than fail the batch. An
    integer column modulo a power of two is a bitwise and (the same for negative numbers
    too, two's complement; a sixth of the time).
    """
    if (
        isinstance(right, int)
        and not isinstance(right, bool)
        and right > 0
        and right & (right - 1) == 0
        and isinstance(left, (pa.Array, pa.ChunkedArray))
        and pa.types.is_integer(left.type)
        and right <= 2 ** (8 * left.type.byte_width - pa.types.is_signed_integer(left.type))
    ):
        return pc.bit_wise_and(left, pa.scalar(right - 1, left.type))
    try:
        return pc.modulo(left, right)
    except (pa.ArrowInvalid, ZeroDivisionError):
        zero = pc.equal(right, 0)
        found = pc.modulo(left, pc.if_else(zero, 1, right))
        return pc.if_else(zero, pa.scalar(None, found.type), found)


class ExpressionFilter(Filter, name="expression"):
    """Keeps rows where an expression over columns is true, evaluated with Arrow compute.

    E.g. ``"label >= 3 and score < 0.5"``, ``"lang in ['en', 'fr'] and not flagged"``,
    ``"uid % 10 == 0"``. Comparisons, ``and``/``or``/``not``, ``in``, ``+ - * / %``; at most
    ``MAX_EXPRESSION_CHARS`` characters and ``MAX_EXPRESSION_TERMS`` terms. Parsed and
    checked (against the columns too) when the iteration is created.
    """

    _parsed: tuple[str, _Expression] | None = None

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """The expression parses, is within bounds, and uses only what is supported."""
        _parse(params["expr"])

    @classmethod
    def check_schema(cls, params: dict[str, Any], schema: pa.Schema) -> pa.Schema:
        """Every name in the expression is a column."""
        for name in _parse(params["expr"]).columns:
            if name not in schema.names:
                raise InvalidArgument(
                    f"expression {params['expr']!r:.200} names unknown column {name!r}; "
                    f"columns: {', '.join(schema.names)}"
                )
        return schema

    def filter_batch(self, batch: pa.RecordBatch, *, expr: str) -> pa.BooleanArray:  # type: ignore[override]
        """The mask of rows where ``expr`` holds (null counts as false)."""
        if self._parsed is None or self._parsed[0] != expr:  # once per iteration, not per batch
            self._parsed = (expr, _parse(expr))
        parsed = self._parsed[1]
        result = _evaluate(parsed.tree.body, batch, parsed)
        if not isinstance(result, (pa.Array, pa.ChunkedArray)):
            return pa.array(np.full(batch.num_rows, bool(result)))
        if not pa.types.is_boolean(result.type):
            raise InvalidArgument(
                f"filter expression {expr!r:.200} gives {result.type} values, not true/false: "
                "compare them, e.g. label > 0"
            )
        return pc.fill_null(result, False) if result.null_count else result


class ArrowCollater(Collater, name="arrow"):
    """The default: the batch's rows as they are, as one Arrow record batch (zero copy)."""

    rowwise = True

    def collate_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:  # type: ignore[override]
        """The batch unchanged."""
        return batch


class ByteTokenizer(Preprocessor, name="byte_tokenize"):
    """UTF-8 bytes of a text column as fixed-length token ids, ready for a byte-level model.

    Adds ``{output}`` (``max_length`` int32 ids: byte + ``offset``, ``pad_id`` after the end)
    and ``{output}_mask`` (1 for tokens, 0 for padding); ``drop`` removes the text column.
    Arrow kernels and whole-batch numpy arithmetic (no Python per row).
    """

    rowwise = True

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """A positive length; int32 offset and pad id."""
        if not 1 <= params["max_length"] <= MAX_TOKENS:
            raise InvalidArgument(
                f"byte_tokenize max_length must be within 1..{MAX_TOKENS}, "
                f"got {params['max_length']}"
            )
        _check_ids(params["offset"], params["pad_id"])

    @classmethod
    def check_schema(cls, params: dict[str, Any], schema: pa.Schema) -> pa.Schema:
        """The column holds text; the outputs take new names."""
        column, output = params["column"], params["output"]
        kind = _column(schema, column, "byte_tokenize")
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InvalidArgument(f"byte_tokenize needs a string column, {column!r} is {kind}")
        kept = [f for f in schema if not (params["drop"] and f.name == column)]
        for name in (output, f"{output}_mask"):
            if name in (f.name for f in kept):
                raise InvalidArgument(
                    f"byte_tokenize output {name!r} is already a column; choose another output"
                )
        length = params["max_length"]
        return pa.schema(
            [
                *kept,
                pa.field(output, pa.list_(pa.int32(), length)),
                pa.field(f"{output}_mask", pa.list_(pa.int8(), length)),
            ]
        )

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
        ids, mask = _byte_tokens(text, max_length, offset, pad_id)
        names = [n for n in batch.schema.names if not (drop and n == column)]
        arrays = [batch.column(n) for n in names]
        arrays += [
            pa.FixedSizeListArray.from_arrays(_wrap(ids, pa.int32()), max_length),
            pa.FixedSizeListArray.from_arrays(_wrap(mask, pa.int8()), max_length),
        ]
        return pa.RecordBatch.from_arrays(arrays, names=[*names, output, f"{output}_mask"])


MASK_TABLE_TOKENS = 1024
"""Up to this ``max_length`` the padding masks are rows of one cached table (a gather of
rows); longer ones are computed by comparison."""


@functools.lru_cache(maxsize=8)
def _mask_table(length: int) -> np.ndarray:
    """Row ``k``: ``length`` int8 flags, the first ``k`` set (read-only)."""
    table = np.tri(length + 1, length, -1, dtype=np.int8)
    table.flags.writeable = False
    return table


def _offsets(array: pa.Array) -> np.ndarray:
    """The ``len + 1`` value offsets of a (large) binary or string array, as numpy (no copy)."""
    large = pa.types.is_large_binary(array.type) or pa.types.is_large_string(array.type)
    kind = np.dtype(np.int64 if large else np.int32)
    return np.frombuffer(
        array.buffers()[1], dtype=kind, count=len(array) + 1, offset=array.offset * kind.itemsize
    )


def _check_ids(offset: int, pad_id: int) -> None:
    """Offset and pad id are int32 (plain Python: ``pa.scalar`` would import pandas)."""
    for name, value in (("offset", offset), ("pad_id", pad_id)):
        if not -(2**31) <= value < 2**31:
            raise InvalidArgument(f"byte_tokenize {name} must be an int32, got {value}")


def _wrap(values: np.ndarray, kind: pa.DataType) -> pa.Array:
    """A C-contiguous numpy array as an Arrow array of the same memory (no copy).

    Not ``pa.array``: its first call in a process imports pandas (a quarter of a second),
    which the first batch a worker process times would count as the plugin's cost.
    """
    return pa.Array.from_buffers(kind, values.size, [None, pa.py_buffer(values)])


def _wrapped(value: int) -> int:
    """An integer as int32 arithmetic sees it (modulo 2**32)."""
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


def _byte_tokens(
    text: pa.Array, length: int, offset: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and mask (int8), each of shape ``(rows, length)``, of a string array.

    Arrow cuts the bytes to ``length`` and right-pads them to exactly ``length`` (byte
    kernels: a cut through a multi-byte character leaves plain bytes), so that the padded
    bytes are one ``rows x length`` matrix; the rest is whole-matrix numpy arithmetic. A
    null text tokenizes as the empty string.
    """
    _check_ids(offset, pad_id)
    rows = len(text)
    if not rows:
        return np.zeros((0, length), dtype=np.int32), np.zeros((0, length), dtype=np.int8)
    if text.null_count:
        text = pc.fill_null(text, "")
    large = pa.types.is_large_string(text.type)
    cut = pc.binary_slice(text.cast(pa.large_binary() if large else pa.binary()), 0, length)
    sizes = np.diff(_offsets(cut))
    # the cut bytes seen as text again (the same buffers, not validated) for the padding
    padded = pc.ascii_rpad(
        pa.Array.from_buffers(text.type, rows, cut.buffers(), offset=cut.offset),
        width=length,
        padding=" ",
    )
    matrix = np.frombuffer(
        padded.buffers()[2], dtype=np.uint8, count=rows * length, offset=int(_offsets(padded)[0])
    ).reshape(rows, length)
    if length <= MASK_TABLE_TOKENS:
        mask = _mask_table(length)[sizes]
    else:
        mask = (np.arange(length) < sizes[:, None]).view(np.int8)
    # byte + offset for a token, pad_id after the end: (byte + offset - pad_id) * mask + pad_id
    # (int32 arithmetic, wrapping as Arrow's add does)
    ids = matrix.astype(np.int32)
    if step := _wrapped(offset - pad_id):
        ids += np.int32(step)
    ids *= mask
    if pad_id:
        ids += np.int32(pad_id)
    return ids, mask


MAX_BOUNDARIES = 10_000


class BucketCategorizer(Categorizer, name="bucket"):
    """Buckets of a numeric column, or of the UTF-8 length of a text column, by boundaries.

    Category ``i`` holds values in ``[boundaries[i - 1], boundaries[i])`` (category 0 those
    below the first, ``len(boundaries)`` those at or above the last); a null value is a
    category of its own. E.g. ``{"column": "text", "boundaries": [64, 256, 1024]}`` makes 4
    length buckets; ``{"column": "aspect", "boundaries": [0.75, 1.34]}`` 3 aspect ratios.
    """

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """The boundaries ascend (strictly) and are not too many."""
        bounds = params["boundaries"]
        if not bounds or len(bounds) > MAX_BOUNDARIES:
            raise InvalidArgument(
                f"bucket boundaries must be 1 to {MAX_BOUNDARIES} numbers, got {len(bounds)}"
            )
        if any(b <= a for a, b in itertools.pairwise(bounds)):
            raise InvalidArgument(f"bucket boundaries must ascend strictly, got {bounds[:20]}")

    @classmethod
    def check_schema(cls, params: dict[str, Any], schema: pa.Schema) -> pa.Schema:
        """The column holds numbers or text."""
        kind = _column(schema, params["column"], "bucket")
        if not (_numeric(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InvalidArgument(
                f"bucket needs a numeric or text column, {params['column']!r} is {kind}"
            )
        return schema

    def categorize_batch(  # type: ignore[override]
        self, batch: pa.RecordBatch, *, column: str, boundaries: list[float]
    ) -> pa.Array:
        """Each row's bucket (int32), null where the value is null."""
        values = batch.column(column)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            values = pc.utf8_length(values)
        numbers = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
        buckets = np.searchsorted(np.asarray(boundaries, dtype=np.float64), numbers, "right")
        nulls = np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        return pa.array(buckets.astype(np.int32), mask=nulls if nulls.any() else None)
