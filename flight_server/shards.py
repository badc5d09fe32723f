"""Shard files: read and write Parquet, Arrow IPC/Feather, CSV and JSON lines as Arrow."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ..protocol import UidValue, parse_type, types_compatible
from ..protocol.errors import InvalidArgument, SchemaMismatch, ShardNotFound, StorageError
from ..protocol.shards import (
    FORMATS,
    canonical_format,
    format_of,
    shard_file_name,
    shard_index_of,
)
from .storage import Location

__all__ = [
    "FORMATS",
    "ShardStats",
    "check_shard_schema",
    "check_written_schema",
    "conform",
    "declared_schema",
    "fetch_shard",
    "format_of",
    "read_shard",
    "read_shard_schema",
    "shard_file_name",
    "shard_index_of",
    "shard_stats",
    "write_shard",
]


def declared_schema(columns: Sequence[tuple[str, str]]) -> pa.Schema:
    """The Arrow schema of ``(name, type string)`` pairs."""
    return pa.schema([pa.field(name, parse_type(type_)) for name, type_ in columns])


def fetch_shard(location: Location, path: str, size: int | None = None) -> pa.Buffer | None:
    """A shard's bytes in memory when it lives in remote storage; None for local files.

    Fetch once to read a remote shard more than once (its schema, then its rows); ``size``,
    when known, saves a request.
    """
    return None if location.is_local else location.fetch(path, size)


def _open(
    location: Location, path: str, data: pa.Buffer | None = None, size: int | None = None
) -> pa.NativeFile:
    """A shard as an Arrow file: local files in place, others fetched whole into memory."""
    if data is not None:
        return pa.BufferReader(data)
    if not location.is_local:
        return pa.BufferReader(location.fetch(path, size))
    try:
        return location.arrow_fs.open_input_file(path)
    except FileNotFoundError as exc:
        raise ShardNotFound(
            f"shard file {location.url_of(path)} does not exist (removed or renamed since it "
            "was registered? sync the shardset to forget it)"
        ) from exc
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"cannot open shard {location.url_of(path)}: {exc}") from exc


def read_shard_schema(
    location: Location, path: str, fmt: str, data: pa.Buffer | None = None
) -> pa.Schema:
    """The schema stored in a shard (CSV and JSON lines: inferred from its first block).

    ``data``: the shard's bytes when already fetched (see ``fetch_shard``).
    """
    with _open(location, path, data) as source:
        try:
            if fmt == "parquet":
                return pq.read_schema(source)
            if fmt == "arrow":
                return _open_ipc(source).schema
            if fmt == "csv":
                return pa_csv.open_csv(source).schema
            return pa_json.read_json(source).schema
        except pa.ArrowException as exc:
            raise SchemaMismatch(f"cannot read shard {location.url_of(path)}: {exc}") from exc


def _open_ipc(
    source: pa.NativeFile,
) -> pa.ipc.RecordBatchFileReader | pa.ipc.RecordBatchStreamReader:
    try:
        return pa_ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa_ipc.open_stream(source)


def read_shard(
    location: Location,
    path: str,
    fmt: str,
    schema: pa.Schema,
    columns: Sequence[str] | None = None,
    data: pa.Buffer | None = None,
    size: int | None = None,
) -> pa.Table:
    """Read a shard into memory as a table of the declared ``schema``.

    ``columns`` projects (only those are read where the format allows). Types are cast to
    the declared ones; a column that is missing or cannot be cast raises ``SchemaMismatch``
    naming the file and the column. A shard in remote storage is fetched whole into memory
    first (retried on transient errors; nothing touches the disk) unless its bytes are
    given as ``data``; its ``size``, when known, saves a request. A missing one raises
    ``ShardNotFound``.
    """
    wanted = list(columns) if columns is not None else schema.names
    target = pa.schema([schema.field(name) for name in wanted])
    url = location.url_of(path)
    with _open(location, path, data, size) as source:
        try:
            if fmt == "parquet":
                # Arrow decodes the columns and row groups of one file side by side on its
                # CPU pool (one thread per core), whatever the number of files read at once
                table = pq.read_table(source, columns=wanted, use_threads=True)
            elif fmt == "arrow":
                table = _open_ipc(source).read_all().select(wanted)
            elif fmt == "csv":
                table = pa_csv.read_csv(
                    source,
                    convert_options=pa_csv.ConvertOptions(
                        column_types={f.name: f.type for f in target},
                        include_columns=wanted,
                        # write_csv writes null as nothing and "" quoted: keep them apart
                        strings_can_be_null=True,
                        quoted_strings_can_be_null=False,
                    ),
                )
            else:
                table = pa_json.read_json(
                    source,
                    parse_options=pa_json.ParseOptions(
                        explicit_schema=target, unexpected_field_behavior="ignore"
                    ),
                ).select(wanted)
        except KeyError as exc:
            raise SchemaMismatch(f"shard {url} has no column {exc}") from exc
        except pa.ArrowException as exc:
            if data is None and not location.is_local:
                source.seek(0)
                data = source.read_buffer()
            message = _name_csv_column(location, path, fmt, str(exc).splitlines()[0], data)
            raise SchemaMismatch(
                f"cannot read shard {url} as the declared columns: {message}"
            ) from exc
        except OSError as exc:
            raise StorageError(f"cannot read shard {url}: {exc}") from exc
    return conform(table, target, url)


def _name_csv_column(
    location: Location, path: str, fmt: str, message: str, data: pa.Buffer | None
) -> str:
    """Arrow's CSV errors say ``column #3``; a user wants the column's name."""
    match = re.search(r"CSV column #(\d+)", message)
    if fmt != "csv" or match is None:
        return message
    names = read_shard_schema(location, path, fmt, data).names
    index = int(match.group(1))
    if index < len(names):
        return message.replace(match.group(0), f"CSV column {names[index]!r}")
    return message


def conform(table: pa.Table, target: pa.Schema, url: str, lenient: bool = False) -> pa.Table:
    """Check ``table`` against the declared schema and cast it to exactly that schema.

    ``lenient`` (for tables written through the server, whose values are all at hand) also
    accepts other integer or float widths when every value fits the declared type.
    """
    missing = [name for name in target.names if name not in table.column_names]
    if missing:
        raise SchemaMismatch(
            f"shard {url} lacks declared column(s) {', '.join(map(repr, missing))}"
        )
    table = table.select(target.names)
    if table.schema.equals(target):
        return table
    for declared in target:
        found = table.schema.field(declared.name).type
        if lenient and _same_number_kind(declared.type, found):
            continue
        if not types_compatible(declared.type, found):
            raise SchemaMismatch(
                f"shard {url}: column {declared.name!r} is {found}, declared {declared.type}"
            )
    try:
        return table.cast(target)
    except pa.ArrowException as exc:
        raise SchemaMismatch(f"shard {url}: {str(exc).splitlines()[0]}") from exc


def check_written_schema(found: pa.Schema, declared: pa.Schema, url: str) -> None:
    """Refuse, from its schema alone, a table written through the server (``conform``'s rules).

    Every declared column must be there, with a type that casts to the declared one (other
    integer or float widths too: their values are checked when the rows are cast).
    """
    missing = [name for name in declared.names if name not in found.names]
    if missing:
        raise SchemaMismatch(
            f"shard {url} lacks declared column(s) {', '.join(map(repr, missing))}"
        )
    for field in declared:
        theirs = found.field(field.name).type
        if not (_same_number_kind(field.type, theirs) or types_compatible(field.type, theirs)):
            raise SchemaMismatch(
                f"shard {url}: column {field.name!r} is {theirs}, declared {field.type}"
            )


def _same_number_kind(declared: pa.DataType, found: pa.DataType) -> bool:
    return (pa.types.is_integer(declared) and pa.types.is_integer(found)) or (
        pa.types.is_floating(declared) and pa.types.is_floating(found)
    )


def check_shard_schema(found: pa.Schema, declared: pa.Schema, url: str) -> None:
    """Raise ``SchemaMismatch`` when a stored schema cannot be read as the declared one."""
    for field in declared:
        index = found.get_field_index(field.name)
        if index < 0:
            raise SchemaMismatch(f"shard {url} lacks declared column {field.name!r}")
        if not types_compatible(field.type, found.field(index).type):
            raise SchemaMismatch(
                f"shard {url}: column {field.name!r} is {found.field(index).type}, "
                f"declared {field.type}"
            )


@dataclass(frozen=True)
class ShardStats:
    """Row count and uid range of a shard, as the catalog records them."""

    num_rows: int
    uid_min: UidValue
    uid_max: UidValue


def shard_stats(table: pa.Table, uid_column: str) -> ShardStats:
    """Row count and uid range of a table holding (at least) the uid column."""
    uids = table.column(uid_column)
    if uids.null_count:
        raise SchemaMismatch(f"uid column {uid_column!r} holds {uids.null_count} null value(s)")
    if not (
        pa.types.is_integer(uids.type)
        or pa.types.is_string(uids.type)
        or pa.types.is_large_string(uids.type)
    ):
        raise SchemaMismatch(
            f"uid column {uid_column!r} must be integer or string, not {uids.type}"
        )
    if table.num_rows == 0:
        return ShardStats(0, None, None)
    bounds = pc.min_max(uids)
    return ShardStats(table.num_rows, bounds["min"].as_py(), bounds["max"].as_py())


def _encode(table: pa.Table, fmt: str, sink: pa.NativeFile) -> None:
    if fmt == "parquet":
        pq.write_table(table, sink)
    elif fmt == "arrow":
        with pa_ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    elif fmt == "csv":
        pa_csv.write_csv(table, sink)
    else:
        _write_jsonl(table, sink)


def write_shard(location: Location, path: str, table: pa.Table, fmt: str) -> int:
    """Write a table as one shard file and return its size in bytes.

    The file appears whole or not at all. On local disk it is written under a temporary name
    and renamed; elsewhere it is encoded in memory and stored with one call (an object
    store publishes a put whole), retried on transient errors.
    """
    fmt = canonical_format(fmt)
    url = location.url_of(path)
    if not location.is_local:
        sink = pa.BufferOutputStream()
        try:
            _encode(table, fmt, sink)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError) as exc:
            raise _unwritable(fmt, exc) from exc
        data = sink.getvalue()
        location.store(path, data)
        return data.size
    temporary = path + ".tmp-writing"
    try:
        location.makedirs()
        with location.arrow_fs.open_output_stream(temporary) as stream:
            _encode(table, fmt, stream)
        location.arrow_fs.move(temporary, path)
        return int(location.arrow_fs.get_file_info(path).size)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError) as exc:
        _discard(location, temporary)
        raise _unwritable(fmt, exc) from exc
    except OSError as exc:
        _discard(location, temporary)
        raise StorageError(f"cannot write shard {url}: {exc}") from exc


def _unwritable(fmt: str, exc: Exception) -> InvalidArgument:
    return InvalidArgument(
        f"cannot write these columns as {fmt} ({str(exc).splitlines()[0]}): "
        "use format='parquet' or 'arrow' for nested or binary columns"
    )


def _discard(location: Location, path: str) -> None:
    try:
        location.arrow_fs.delete_file(path)
    except (OSError, pa.ArrowException):
        pass


def _write_jsonl(table: pa.Table, sink: pa.NativeFile) -> None:
    for field in table.schema:
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            raise TypeError(f"JSON lines cannot hold binary column {field.name!r}")
    for batch in table.to_batches(max_chunksize=8192):
        lines = "".join(json.dumps(row, default=str) + "\n" for row in batch.to_pylist())
        sink.write(lines.encode())
