"""The catalog: Lavender Flight's system of record (SQLite or PostgreSQL through ADBC).

Datasets, shardsets, columns, shards and iterations with their progress. Its records are
the pydantic models of ``protocol.records``; no other layer writes SQL. ``open_catalog``
opens the database a setting names (a SQLite file, the embedded default, or a
``postgresql://`` URL); ``Dialect`` holds what differs between the two.
"""

from __future__ import annotations

from ._catalog import Catalog, new_id, open_catalog
from ._changes import ChangeRecord, EpochRows
from ._database import Database, Transaction
from ._dialect import Dialect, Lock, PostgresDialect, SQLiteDialect
from ._progress import VersionChanged
from ._schema import SCHEMA_VERSION
from ._target import SUPPORTED_FORMS, CatalogTarget, mask_url, parse_target

__all__ = [
    "SCHEMA_VERSION",
    "SUPPORTED_FORMS",
    "Catalog",
    "CatalogTarget",
    "ChangeRecord",
    "Database",
    "Dialect",
    "EpochRows",
    "Lock",
    "PostgresDialect",
    "SQLiteDialect",
    "Transaction",
    "VersionChanged",
    "mask_url",
    "new_id",
    "open_catalog",
    "parse_target",
]
