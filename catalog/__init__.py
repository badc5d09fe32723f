"""The catalog: Lavender Flight's system of record (SQLite through ADBC).

Datasets, shardsets, columns, shards and iterations with their progress. Its records are
the pydantic models of ``protocol.records``; no other layer writes SQL.
"""

from __future__ import annotations

from ._catalog import Catalog, new_id
from ._schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Catalog", "new_id"]
