"""The catalog: Lavender Flight's system of record (SQLite through ADBC, pydantic records)."""

from __future__ import annotations

from . import errors
from ._catalog import Catalog, new_id
from ._schema import SCHEMA_VERSION
from ._types import format_type, parse_type, types_compatible
from .records import (
    ColumnOptions,
    Dataset,
    DatasetColumn,
    IterationProgress,
    IterationRecord,
    RankProgress,
    RankProgressRecord,
    Shard,
    Shardset,
    SyncResult,
    UidValue,
    column_clashes,
)

__all__ = [
    "SCHEMA_VERSION",
    "Catalog",
    "ColumnOptions",
    "Dataset",
    "DatasetColumn",
    "IterationProgress",
    "IterationRecord",
    "RankProgress",
    "RankProgressRecord",
    "Shard",
    "Shardset",
    "SyncResult",
    "UidValue",
    "column_clashes",
    "errors",
    "format_type",
    "new_id",
    "parse_type",
    "types_compatible",
]
