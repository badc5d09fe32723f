"""Feature shardsets: add columns to a dataset without rewriting it.

A feature shardset holds the uid and new columns; the server joins it to the main shardset
by uid (a left join: a sample it lacks reads as nulls). Written shard by shard in the main
shardset's order, each feature shard holds the same uids in the same order as the main shard
with its index, and the server attaches its columns without any lookup.

- :func:`write_feature_shardset` computes the columns from the dataset itself, batch by
  batch, and is resumable.
- :class:`FeatureWriter` writes the output of any loop (an ``Iteration`` for instance).
"""

from __future__ import annotations

import os
import posixpath
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from ..protocol import ColumnOptions, Shard, Shardset, column_clashes, format_type, parse_type
from ..protocol.errors import InvalidArgument, SchemaMismatch
from ..protocol.shards import canonical_format
from . import api
from .connection import LavenderClient, column_options
from .writer import Writer

__all__ = ["ComputeOutput", "FeatureWriter", "normalize_location", "write_feature_shardset"]

ComputeOutput: TypeAlias = pa.Table | pa.RecordBatch | Mapping[str, Any]
"""Columns: a table, a record batch, or a mapping of names to arrays, lists, numpy or torch."""


def normalize_location(location: str) -> str:
    """A shardset location in the form used to tell whether two locations are the same folder.

    ``file://`` (or no protocol): the path with ``~`` expanded, made absolute against this
    process's working directory, symlinks resolved, ``.``/``..`` and trailing slashes removed
    (the server resolves a relative path against its own working directory, so a relative
    location matches only when both run in the same folder). Other protocols: the protocol
    and the path with ``.``/``..`` and leading and trailing slashes removed
    (``memory://x/`` and ``memory:///x`` are the same).
    """
    text = location.strip()
    protocol, sep, path = text.partition("://")
    if not sep:
        protocol, path = "file", text
    protocol = protocol.lower()
    if protocol in ("file", "local"):
        return "file://" + os.path.normpath(os.path.realpath(os.path.expanduser(path)))
    path = posixpath.normpath(path.strip("/")) if path.strip("/") else ""
    return f"{protocol}://{path}"


def _as_array(value: Any, where: str) -> pa.Array | pa.ChunkedArray:
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        try:
            value = value.detach().cpu().numpy()
        except (TypeError, RuntimeError) as exc:
            raise SchemaMismatch(f"{where}: cannot turn the tensor into an array: {exc}") from None
    if isinstance(value, np.ndarray):
        if value.ndim == 2:  # one fixed-size vector per row
            flat = pa.array(np.ascontiguousarray(value).reshape(-1))
            return pa.FixedSizeListArray.from_arrays(flat, value.shape[1])
        if value.ndim != 1:
            raise SchemaMismatch(
                f"{where}: an array of shape {value.shape} is not a column; give one value "
                "(or one 1-D vector) per row"
            )
    elif isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise SchemaMismatch(
            f"{where}: a column must be a sequence of values, got {type(value).__name__}"
        )
    try:
        return pa.array(value)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise SchemaMismatch(f"{where}: cannot make an Arrow column of it: {exc}") from None


def _as_table(output: Any, where: str) -> pa.Table:
    """The columns of ``output`` as a table (a table, a record batch or a mapping)."""
    if isinstance(output, pa.RecordBatch):
        output = pa.Table.from_batches([output])
    if isinstance(output, pa.Table):
        names = output.column_names
        arrays: list[pa.Array | pa.ChunkedArray] = list(output.columns)
    elif isinstance(output, Mapping):
        names = [str(name) for name in output]
        arrays = [_as_array(value, f"{where}, column {name!r}") for name, value in output.items()]
    else:
        raise InvalidArgument(
            f"{where}: expected a pyarrow Table, a RecordBatch or a mapping of column names to "
            f"values, got {type(output).__name__}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SchemaMismatch(f"{where}: column(s) {', '.join(map(repr, repeated))} appear twice")
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        sizes = ", ".join(f"{n!r}: {len(a)}" for n, a in zip(names, arrays, strict=True))
        raise SchemaMismatch(f"{where}: columns of different lengths ({sizes})")
    return pa.Table.from_arrays(arrays, names=names)


def _aligned(output: Any, uids: pa.ChunkedArray, uid: str, where: str) -> pa.Table:
    """``compute``'s output for a batch whose uids are ``uids``: uid first, in input order."""
    table = _as_table(output, where)
    expected = len(uids)
    if table.num_columns and table.num_rows != expected:
        raise SchemaMismatch(
            f"{where}: compute returned {table.num_rows} rows for {expected} input rows; it "
            "must return one value per input row, in the same order"
        )
    if uid in table.column_names:
        got = table.column(uid)
        table = table.drop_columns([uid])
        if isinstance(got, pa.Array):
            got = pa.chunked_array([got], type=got.type)
        try:
            got = got.cast(uids.type)
        except pa.ArrowException as exc:
            raise SchemaMismatch(f"{where}: the returned uid column is {got.type}: {exc}") from None
        if not got.equals(uids):
            positions = pc.index_in(uids, value_set=got)
            missing = uids.filter(pc.is_null(positions)).to_pylist()
            extra = got.filter(pc.invert(pc.is_in(got, value_set=uids))).to_pylist()
            if missing or extra:
                raise SchemaMismatch(
                    f"{where}: the returned uids differ from the input's: missing "
                    f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                    f"{extra[:5]}{'...' if len(extra) > 5 else ''}"
                )
            if pc.count_distinct(got).as_py() != len(got):
                raise SchemaMismatch(
                    f"{where}: the returned uids repeat and are in another order than the "
                    "input's; return one row per input row, in input order"
                )
            table = table.take(positions)  # the same uids in another order: put them back
    if not table.num_columns:  # no new column: refused by the caller, which names the rule
        return pa.table({uid: uids})
    return table.add_column(0, pa.field(uid, uids.type), uids)


class _Target:
    """The feature shardset being written: the one already at its location, or made on need."""

    def __init__(
        self,
        client: LavenderClient,
        dataset_id: str,
        location: str,
        fmt: str,
        output_columns: Sequence[ColumnOptions | dict[str, Any]] | None,
        storage_options: Mapping[str, Any] | None,
    ) -> None:
        self.client = client
        self.format = canonical_format(fmt)
        self.location = location
        self.storage_options = storage_options
        self.dataset = client.get_dataset(dataset_id=dataset_id)
        self.uid = self.dataset.uid_column_name
        main = self.dataset.main_shardset
        if main is None:
            raise InvalidArgument(
                f"dataset {self.dataset.name!r} has no shardset yet: write its main shardset first"
            )
        self.main = main
        wanted = normalize_location(location)
        self.shardset: Shardset | None = next(
            (s for s in self.dataset.shardsets if normalize_location(s.location) == wanted), None
        )
        if self.shardset is not None and self.shardset.is_main:
            raise InvalidArgument(
                f"location {location!r} is the main shardset of dataset {self.dataset.name!r}; "
                "a feature shardset needs a folder of its own"
            )
        self.taken = [
            (c.name, s.id)
            for s in self.dataset.shardsets
            if s is not self.shardset
            for c in s.columns
        ]
        uid_type = next((c.type_ for c in main.columns if c.name == self.uid), None)
        self.uid_type = parse_type(uid_type) if uid_type else pa.int64()
        self.declared: list[ColumnOptions] | None = None
        self.shards: dict[int, Shard] = {}
        self._writer: Writer | None = None
        if self.shardset is not None:
            self.declared = [
                ColumnOptions(name=c.name, type_=c.type_, description=c.description)
                for c in self.shardset.columns
                if c.name != self.uid
            ]
            self.shards = {s.index: s for s in client.list_shards(dataset_id, self.shardset.id)}
        elif output_columns is not None:
            declared = [column_options(c) for c in output_columns]
            declared = [c for c in declared if c.name != self.uid]
            self.check_names([c.name for c in declared], "output_columns")
            self.declared = declared

    @property
    def schema(self) -> pa.Schema | None:
        """The uid and the declared columns (None until known)."""
        if self.declared is None:
            return None
        fields = [pa.field(c.name, parse_type(c.type_)) for c in self.declared]
        return pa.schema([pa.field(self.uid, self.uid_type), *fields])

    def check_names(self, names: Sequence[str], where: str) -> None:
        """Refuse no columns, a name of another shardset, or names other than the declared ones."""
        if not names:
            raise InvalidArgument(
                f"{where}: no column besides the uid {self.uid!r}; a feature shardset adds at "
                "least one"
            )
        clashes = column_clashes(self.uid, names, self.taken)
        if clashes:
            raise InvalidArgument(
                f"{where}: column name(s) {', '.join(clashes)} already in dataset "
                f"{self.dataset.name!r}; a feature shardset adds columns under new names"
            )
        if self.declared is not None and set(names) != {c.name for c in self.declared}:
            owner = (
                f"shardset {self.shardset.id} at {self.shardset.location}"
                if self.shardset
                else "output_columns"
            )
            raise SchemaMismatch(
                f"{where}: columns {sorted(names)} differ from the ones {owner} declares "
                f"({sorted(c.name for c in self.declared)})"
            )

    def conform(self, table: pa.Table, where: str) -> pa.Table:
        """``table`` (uid first) cast to the declared columns, declaring them on first use."""
        if self.declared is None:
            declared = []
            for field in table.schema:
                if field.name == self.uid:
                    continue
                if pa.types.is_null(field.type):
                    raise InvalidArgument(
                        f"{where}: column {field.name!r} holds only nulls, so its type is "
                        "unknown; pass output_columns=[ColumnOptions(name=..., type_=...)]"
                    )
                try:
                    declared.append(ColumnOptions(name=field.name, type_=format_type(field.type)))
                except (ValidationError, InvalidArgument) as exc:
                    raise InvalidArgument(
                        f"{where}: cannot declare column {field.name!r} of type {field.type} "
                        f"({exc}); pass output_columns"
                    ) from None
            self.declared = declared
        schema = self.schema
        assert schema is not None
        try:
            return table.select(schema.names).cast(schema)
        except (pa.ArrowException, ValueError) as exc:
            raise SchemaMismatch(
                f"{where}: the columns do not fit the declared types "
                f"({', '.join(f'{f.name}: {f.type}' for f in schema)}): "
                f"{str(exc).splitlines()[0]}"
            ) from None

    def ensure(self) -> Shardset:
        """The shardset, created with the declared columns when it does not exist yet."""
        if self.shardset is None:
            assert self.declared is not None
            uid_column = ColumnOptions(name=self.uid, type_=format_type(self.uid_type))
            self.shardset = self.client.create_shardset(
                self.dataset.id,
                self.location,
                [uid_column, *self.declared],
                storage_options=self.storage_options,
            )
            # files already at the location (from a shardset since removed) are registered
            self.shards = {
                s.index: s for s in self.client.list_shards(self.dataset.id, self.shardset.id)
            }
        return self.shardset

    def written(self, main_shard: Shard) -> bool:
        """Whether the feature shard of ``main_shard`` is there, with its rows and uid range."""
        found = self.shards.get(main_shard.index)
        return found is not None and (found.num_rows, found.uid_min, found.uid_max) == (
            main_shard.num_rows,
            main_shard.uid_min,
            main_shard.uid_max,
        )

    def write(self, table: pa.Table, index: int) -> Shard:
        """Write ``table`` as shard ``index`` (replacing the one there, if any)."""
        shardset = self.ensure()
        if self._writer is None:
            self._writer = Writer(self.client, shardset, self.format)
        shard = self._writer.write(table, shard_index=index, overwrite=index in self.shards)
        self.shards[index] = shard
        return shard

    def fresh(self) -> Shardset:
        """The shardset as the server has it now."""
        return self.client.get_shardset(self.dataset.id, self.ensure().id)


class _Progress:
    """One line per shard on stderr."""

    def __init__(self, location: str, shards: int, rows: int, enabled: bool) -> None:
        self.location, self.shards, self.rows, self.enabled = location, shards, rows, enabled
        self.done = self.computed = 0
        self.start = time.perf_counter()

    def _say(self, position: int, what: str) -> None:
        if self.enabled:
            sys.stderr.write(
                f"feature shardset {self.location}: shard {position}/{self.shards} {what}\n"
            )
            sys.stderr.flush()

    def skipped(self, position: int, rows: int, why: str) -> None:
        self.done += rows
        self._say(position, f"skipped ({why})")

    def written(self, position: int, rows: int) -> None:
        self.done += rows
        self.computed += rows
        rate = self.computed / max(time.perf_counter() - self.start, 1e-9)
        self._say(position, f"written ({self.done:,}/{self.rows:,} rows, {_rate(rate)} rows/s)")


def _rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.1f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


def write_feature_shardset(
    dataset_id: str,
    location: str,
    compute: Callable[[pa.Table], ComputeOutput],
    *,
    columns: Sequence[str] | None = None,
    shardsets: Sequence[str] | None = None,
    batch_size: int = 1024,
    format: str = "parquet",
    output_columns: Sequence[ColumnOptions | dict[str, Any]] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    client: LavenderClient | None = None,
) -> Shardset:
    """Compute new columns over a dataset and write them as a feature shardset at ``location``.

    For each main shard in order, its rows (joined with the other shardsets, projected to
    ``columns`` and ``shardsets`` when given; the uid always comes) are cut into batches of
    ``batch_size`` and handed to ``compute(batch: pa.Table)``. It returns the new columns: a
    table, a record batch, or a mapping of names to lists, numpy arrays, Arrow arrays or 1-D
    torch tensors (2-D arrays become fixed-size lists), one value per input row. A uid
    column in the output is optional; when there, it must hold the input's uids (order may
    differ). The outputs of a main shard are written as the feature shard with the same
    index: same uids, same order, so the server attaches them without a lookup.

    The shardset is created at the first batch (before any compute when ``output_columns``
    are given), declaring the dataset's uid and the output's columns with the types of
    ``output_columns`` or, without them, of the first output. Names already in the dataset
    are refused before anything is written.

    Resumable: when the dataset already has a shardset at ``location`` (same folder as
    :func:`normalize_location` decides), main shards whose feature shard is registered with
    their row count and uid range are skipped without calling ``compute``; the others are
    (re)written. After an exception in ``compute``, call again with the same arguments: it
    goes on from the shard that failed, and the result is the same as one clean run. Main
    shards with no rows get no feature shard.

    Args:
        dataset_id: the dataset.
        location: the folder of the feature shardset (``file://...``, ``s3://...``).
        compute: the new columns of a batch.
        columns: the columns ``compute`` reads (default: all of the other shardsets').
        shardsets: the shardsets joined for ``compute`` (default: all others).
        batch_size: rows per ``compute`` call.
        format: shard format: ``parquet``, ``arrow``, ``csv`` or ``jsonl``.
        output_columns: the new columns' declarations (``ColumnOptions`` or dicts);
            default: inferred from the first output. Used when the shardset is created.
        storage_options: fsspec options of the location, as in ``create_shardset``.
        progress: print one line per shard on stderr.
        client: the connection to the server (default: the default client).

    Returns:
        The feature shardset, as the server has it after the last shard.

    Raises:
        SchemaMismatch: an output of the wrong length, with other uids, or whose values do
            not fit the declared types (the message names the shard and batch).
        InvalidArgument: no new column, a name already in the dataset, a bad argument.
    """
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
    client = client or api.get_client()
    target = _Target(client, dataset_id, location, format, output_columns, storage_options)
    uid = target.uid
    own = target.shardset.id if target.shardset is not None else None
    if shardsets is not None:
        if own is not None and own in shardsets:
            raise InvalidArgument(
                f"shardsets lists {own}, the feature shardset being written at {location!r}; "
                "compute cannot read its own output"
            )
        read_ids = list(shardsets)
    else:  # explicit, so the feature shardset is never joined in once created
        read_ids = [s.id for s in target.dataset.shardsets if s.id != own]
    if columns is not None and target.declared is not None:
        own_columns = sorted({c.name for c in target.declared} & set(columns))
        if own_columns:
            raise InvalidArgument(
                f"columns lists {own_columns}, written by this feature shardset; compute "
                "cannot read its own output"
            )
    read_columns = list(columns) if columns is not None else None
    main_shards = client.list_shards(dataset_id, target.main.id)
    report = _Progress(location, len(main_shards), sum(s.num_rows for s in main_shards), progress)
    if target.declared is not None:
        target.ensure()  # declared up front: a name clash is refused before any compute
    for position, main_shard in enumerate(main_shards, 1):
        if main_shard.num_rows == 0:
            report.skipped(position, 0, "no rows")
            continue
        if target.written(main_shard):
            report.skipped(position, main_shard.num_rows, "already written")
            continue
        rows = client.read_shard(dataset_id, main_shard.index, read_ids, read_columns)
        pieces = []
        for number, start in enumerate(range(0, rows.num_rows, batch_size)):
            batch = rows.slice(start, batch_size)
            where = (
                f"compute on shard {main_shard.index}, batch {number} "
                f"(rows {start}..{start + batch.num_rows - 1})"
            )
            try:
                output = compute(batch)
            except Exception as exc:
                if hasattr(exc, "add_note"):  # Python 3.11+
                    exc.add_note(f"in {where} of feature shardset {location}")
                raise
            table = _aligned(output, batch.column(uid), uid, where)
            target.check_names(table.column_names[1:], where)
            pieces.append(target.conform(table, where))
            target.ensure()
        target.write(pa.concat_tables(pieces), main_shard.index)
        report.written(position, rows.num_rows)
    if target.shardset is None:
        raise InvalidArgument(
            f"dataset {target.dataset.name!r} has no rows to compute from, so the columns' "
            "types are unknown; pass output_columns to create an empty feature shardset"
        )
    return target.fresh()


# Last: the writer of loop output builds on this module's pieces.
from .feature_writer import FeatureWriter  # noqa: E402
