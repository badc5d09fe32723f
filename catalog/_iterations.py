"""Iterations in the catalog: their spec and plan, and each rank's progress as ranges."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..protocol.errors import DatasetNotFound, IterationNotFound
from ..protocol.iterations import (
    IterationPlan,
    IterationRecord,
    IterationSpec,
    RankProgressRecord,
)

if TYPE_CHECKING:
    from ._database import Database, Transaction

__all__ = ["IterationStore"]

_RANGE_FIELDS = ("acked", "filtered", "failed", "inflight")
_RANK_COLUMNS = (
    "iteration_id",
    "rank",
    *_RANGE_FIELDS,
    "updated_at",
    "filtered_acked",
    "failed_acked",
)


class IterationStore:
    """The iteration half of ``Catalog`` (mixed in; uses its database)."""

    _db: Database

    def _query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def create_iteration(self, record: IterationRecord) -> tuple[IterationRecord, bool]:
        """Store a new iteration, or return the one stored under its id; says which."""

        def insert(tx: Transaction) -> bool:
            if not tx.run("SELECT id FROM datasets WHERE id = ?", (record.dataset_id,)):
                raise DatasetNotFound(f"no dataset with id {record.dataset_id!r}")
            if tx.run("SELECT id FROM iterations WHERE id = ?", (record.id,)):
                return False
            tx.run(
                "INSERT INTO iterations (id, dataset_id, spec, plan, total, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.dataset_id,
                    record.spec.model_dump_json(),
                    record.plan.model_dump_json(),
                    record.total,
                    record.created_at,
                ),
            )
            return True

        if self._db.transaction(insert):
            return record, True
        return self.get_iteration(record.id), False

    def get_iteration(self, iteration_id: str) -> IterationRecord:
        """One iteration by id."""
        rows = self._query(
            "SELECT id, dataset_id, spec, plan, total, created_at FROM iterations WHERE id = ?",
            (iteration_id,),
        )
        if not rows:
            raise IterationNotFound(f"no iteration with id {iteration_id!r}")
        return self._iteration(rows[0])

    def list_iterations(
        self, dataset_id: str | None = None, offset: int = 0, limit: int | None = None
    ) -> list[IterationRecord]:
        """Iterations, newest first (of one dataset when given), one page of them.

        ``limit`` of them after skipping ``offset`` (every one by default). Iterations
        created in the same instant come in a fixed order (by id), so pages never overlap.
        """
        sql = "SELECT id, dataset_id, spec, plan, total, created_at FROM iterations"
        params: list[Any] = []
        if dataset_id is not None:
            sql += " WHERE dataset_id = ?"
            params.append(dataset_id)
        sql += " ORDER BY created_at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params += [int(limit), int(offset)]
        rows = self._query(sql, params)
        if limit is None and offset:
            rows = rows[offset:]
        return [self._iteration(r) for r in rows]

    @staticmethod
    def _iteration(row: tuple[Any, ...]) -> IterationRecord:
        iteration_id, dataset_id, spec, plan, total, created_at = row
        return IterationRecord(
            id=iteration_id,
            dataset_id=dataset_id,
            spec=IterationSpec.model_validate_json(spec),
            plan=IterationPlan.model_validate_json(plan),
            total=int(total),
            created_at=float(created_at),
        )

    def load_progress(self, iteration_id: str) -> list[RankProgressRecord]:
        """Progress saved before epochs existed (catalog schema 4), to carry it over."""
        rows = self._query(
            "SELECT rank, acked, filtered, failed, inflight, updated_at, filtered_acked, "
            "failed_acked FROM iteration_ranks "
            "WHERE iteration_id = ? ORDER BY rank",
            (iteration_id,),
        )
        return [
            RankProgressRecord(
                iteration_id=iteration_id,
                rank=int(rank),
                acked=json.loads(acked),
                filtered=json.loads(filtered),
                failed=json.loads(failed),
                inflight=json.loads(inflight),
                updated_at=float(updated_at),
                filtered_acked=int(filtered_acked),
                failed_acked=int(failed_acked),
            )
            for (
                rank,
                acked,
                filtered,
                failed,
                inflight,
                updated_at,
                filtered_acked,
                failed_acked,
            ) in rows
        ]

    def drop_progress(self, iteration_id: str) -> None:
        """Forget progress saved before epochs existed (once carried over)."""

        def drop(tx: Transaction) -> None:
            tx.run("DELETE FROM iteration_ranks WHERE iteration_id = ?", (iteration_id,))

        self._db.transaction(drop)

    def delete_iteration(self, iteration_id: str) -> None:
        """Forget an iteration and its progress."""

        def delete(tx: Transaction) -> None:
            if not tx.run("SELECT id FROM iterations WHERE id = ?", (iteration_id,)):
                raise IterationNotFound(f"no iteration with id {iteration_id!r}")
            for table in ("iteration_ranks", "iteration_rank_states", "iteration_changes"):
                tx.run(f"DELETE FROM {table} WHERE iteration_id = ?", (iteration_id,))
            tx.run("DELETE FROM iterations WHERE id = ?", (iteration_id,))

        self._db.transaction(delete)
