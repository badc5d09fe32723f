"""The contract every side shares: errors, records, column types, wire payloads, ranges.

``client/``, ``panel_ui/`` and any Python Flight client import this package and nothing of
the server side; the server and the catalog import it too. It depends on pyarrow and
pydantic only.

- ``errors``: the one exception tree, each class with its Flight status.
- ``records``: datasets, shardsets, columns, shards, iteration progress (pydantic).
- ``types``: column type names (``int``, ``str``, Arrow type strings) and their checks.
- ``wire``: the versioned envelope of every payload, the catalog's bodies and answers.
- ``iterations``: the iteration spec, commands, tickets, acks, batch metadata, progress.
- ``ranges``: ``[start, stop)`` sets of sequence numbers, as progress is recorded.
- ``shards``: shard formats, file names and how shards of two shardsets pair up.
"""

from __future__ import annotations

from . import errors, iterations, ranges, records, shards, types, wire
from .iterations import IterationProgress, IterationRecord, RankProgress, RankProgressRecord
from .ranges import RangeSet
from .records import (
    REDACTED,
    ColumnOptions,
    Dataset,
    DatasetColumn,
    Shard,
    Shardset,
    SyncResult,
    UidValue,
    column_clashes,
    is_secret_option,
    redact_options,
)
from .types import format_type, parse_type, types_compatible

__all__ = [
    "REDACTED",
    "ColumnOptions",
    "Dataset",
    "DatasetColumn",
    "IterationProgress",
    "IterationRecord",
    "RangeSet",
    "RankProgress",
    "RankProgressRecord",
    "Shard",
    "Shardset",
    "SyncResult",
    "UidValue",
    "column_clashes",
    "errors",
    "format_type",
    "iterations",
    "is_secret_option",
    "parse_type",
    "ranges",
    "records",
    "redact_options",
    "shards",
    "types",
    "types_compatible",
    "wire",
]
