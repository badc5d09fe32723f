"""Catalog tables and their migrations: the same statements on SQLite and PostgreSQL.

Portable SQL only: ``TEXT``, ``INTEGER``, ``BIGINT``, ``DOUBLE PRECISION`` (booleans are
``INTEGER`` 0/1), ``ALTER TABLE ... ADD COLUMN`` with a default. Each migration runs in the
transaction that holds the catalog lock, so servers starting together apply it once.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

# Each entry moves the schema from version i to i + 1. Append, never edit a shipped one.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE datasets (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            uid_column_name TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE shardsets (
            id TEXT PRIMARY KEY,
            dataset_id TEXT NOT NULL REFERENCES datasets (id),
            location TEXT NOT NULL,
            is_main INTEGER NOT NULL,
            position INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX shardsets_by_dataset ON shardsets (dataset_id)",
        """CREATE TABLE shardset_columns (
            shardset_id TEXT NOT NULL REFERENCES shardsets (id),
            position INTEGER NOT NULL,
            name TEXT NOT NULL,
            type TEXT NOT NULL,
            description TEXT NOT NULL,
            PRIMARY KEY (shardset_id, name)
        )""",
        """CREATE TABLE shards (
            shardset_id TEXT NOT NULL REFERENCES shardsets (id),
            shard_index INTEGER NOT NULL,
            location TEXT NOT NULL,
            format TEXT NOT NULL,
            num_rows BIGINT NOT NULL,
            size_bytes BIGINT NOT NULL,
            uid_min TEXT,
            uid_max TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (shardset_id, shard_index)
        )""",
    ],
    [
        """CREATE TABLE iterations (
            id TEXT PRIMARY KEY,
            dataset_id TEXT NOT NULL REFERENCES datasets (id),
            spec TEXT NOT NULL,
            plan TEXT NOT NULL,
            total BIGINT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX iterations_by_dataset ON iterations (dataset_id)",
        """CREATE TABLE iteration_ranks (
            iteration_id TEXT NOT NULL REFERENCES iterations (id),
            rank INTEGER NOT NULL,
            acked TEXT NOT NULL,
            filtered TEXT NOT NULL,
            failed TEXT NOT NULL,
            inflight TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (iteration_id, rank)
        )""",
    ],
    [
        # storage options of a shardset (JSON), merged over the server's defaults
        "ALTER TABLE shardsets ADD COLUMN storage_options TEXT NOT NULL DEFAULT '{}'",
    ],
    [
        # filtered and failed samples inside acknowledged ranges, kept as counts
        "ALTER TABLE iteration_ranks ADD COLUMN filtered_acked BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE iteration_ranks ADD COLUMN failed_acked BIGINT NOT NULL DEFAULT 0",
    ],
    [
        # iteration state per epoch and rank, shared by every server on the catalog: one
        # JSON state per row, changed only inside a write transaction holding the row
        """CREATE TABLE iteration_rank_states (
            iteration_id TEXT NOT NULL REFERENCES iterations (id),
            epoch INTEGER NOT NULL,
            rank INTEGER NOT NULL,
            state TEXT NOT NULL,
            expires_at DOUBLE PRECISION,
            nodes TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (iteration_id, epoch, rank)
        )""",
        "CREATE INDEX rank_states_by_expiry ON iteration_rank_states (expires_at)",
        # servers sharing the catalog, each with its advertised location and heartbeat
        """CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            location TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL,
            info TEXT NOT NULL
        )""",
    ],
    [
        # changes made to a running iteration (mixture weights, a deal to another world
        # size), numbered by the iteration's version: every state transaction reads the
        # version, so a server that missed a change finds out before it acts on it
        "ALTER TABLE iterations ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE iteration_changes (
            iteration_id TEXT NOT NULL REFERENCES iterations (id),
            version INTEGER NOT NULL,
            epoch INTEGER NOT NULL,
            kind TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (iteration_id, version)
        )""",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)
