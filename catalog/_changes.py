"""Changes made to a running iteration, and the transaction that makes one.

A change (new mixture weights, a deal of an epoch to another world size) is stored with
the iteration's next *version*, in the transaction that also rewrites the rank states it
affects. That transaction holds the iteration's row exclusively, while every state
transaction (``update_rank_states``) holds it shared and may check the version: so no claim
or ack runs during a change, and a server that missed one finds out at its next
transaction. The catalog keeps the change's body as JSON text; the engine interprets it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ..protocol.errors import IterationNotFound
from ._progress import ProgressRows, RankRow

if TYPE_CHECKING:
    from ._database import Database, Transaction

__all__ = ["ChangeRecord", "EpochRows", "IterationChanges"]

T = TypeVar("T")


@dataclass(frozen=True)
class ChangeRecord:
    """One stored change of an iteration."""

    version: int
    epoch: int
    kind: str
    body: str
    """JSON text (the engine's)."""
    created_at: float


@dataclass
class EpochRows:
    """What a change transaction is given: every stored state row of one epoch, locked.

    ``add`` records a change (at most one per transaction), ``row`` gives a rank's row
    (a new empty one if it has none), ``drop`` deletes one.
    """

    iteration_id: str
    epoch: int
    version: int
    changes: list[ChangeRecord]
    rows: dict[int, RankRow]
    later: bool = False
    """Some rank has started a later epoch already."""
    added: ChangeRecord | None = None
    dropped: set[int] = field(default_factory=set)

    def row(self, rank: int) -> RankRow:
        """The row of a rank (created empty when there is none)."""
        found = self.rows.get(rank)
        if found is None:
            found = self.rows[rank] = RankRow(self.epoch, rank, None)
        self.dropped.discard(rank)
        return found

    def drop(self, rank: int) -> None:
        """Delete a rank's row."""
        self.rows.pop(rank, None)
        self.dropped.add(rank)

    def add(self, kind: str, body: str, epoch: int | None = None) -> ChangeRecord:
        """Record a change (of this epoch, or ``epoch``) under the iteration's next version."""
        if self.added is not None:
            raise RuntimeError("one change per transaction")
        self.added = ChangeRecord(
            self.version + 1, self.epoch if epoch is None else epoch, kind, body, time.time()
        )
        return self.added


class IterationChanges(ProgressRows):
    """The changes half of ``Catalog`` (mixed in, over the state rows; uses its database)."""

    _db: Database

    @staticmethod
    def _change_rows(tx_or_rows: list[tuple[Any, ...]]) -> list[ChangeRecord]:
        return [
            ChangeRecord(int(v), int(e), str(k), str(b), float(c)) for v, e, k, b, c in tx_or_rows
        ]

    def load_changes(self, iteration_id: str) -> tuple[int, list[ChangeRecord]]:
        """The iteration's version and its changes up to it, oldest first.

        The version is read first: a change that commits meanwhile may be listed beyond
        it, and is left out (the next state transaction tells the caller to look again).

        Raises:
            IterationNotFound: no such iteration.
        """
        found = self._query("SELECT version FROM iterations WHERE id = ?", (iteration_id,))
        if not found:
            raise IterationNotFound(f"no iteration with id {iteration_id!r}")
        version = int(found[0][0])
        rows = self._query(
            "SELECT version, epoch, kind, body, created_at FROM iteration_changes "
            "WHERE iteration_id = ? AND version <= ? ORDER BY version",
            (iteration_id, version),
        )
        return version, self._change_rows(rows)

    def change_epoch(self, iteration_id: str, epoch: int, change: Callable[[EpochRows], T]) -> T:
        """Run ``change`` on every state row of an epoch with the iteration held alone.

        ``change`` may set rows, create (``row``) and ``drop`` them, and ``add`` one change
        record; everything is written in the same transaction, the version bumped when a
        change was added. Like ``update_rank_states``, ``change`` may run more than once.

        Raises:
            IterationNotFound: the iteration does not exist (or was deleted meanwhile).
        """

        def body(tx: Transaction) -> T:
            lock = tx.dialect.for_update("SELECT version FROM iterations WHERE id = ?")
            found = tx.run(lock, (iteration_id,))
            if not found:
                raise IterationNotFound(f"no iteration with id {iteration_id!r}")
            version = int(found[0][0])
            stored = tx.run(
                "SELECT version, epoch, kind, body, created_at FROM iteration_changes "
                "WHERE iteration_id = ? ORDER BY version",
                (iteration_id,),
            )
            rows = self._locked_rows(tx, iteration_id, epoch)
            before = {rank: (row.state, row.expires_at, row.nodes) for rank, row in rows.items()}
            later = tx.run(
                "SELECT rank FROM iteration_rank_states WHERE iteration_id = ? AND epoch > ? "
                "LIMIT 1",
                (iteration_id, epoch),
            )
            epoch_rows = EpochRows(
                iteration_id, epoch, version, self._change_rows(stored), dict(rows), bool(later)
            )
            result = change(epoch_rows)
            for rank in sorted(epoch_rows.dropped):
                if rank in before:
                    tx.run(
                        "DELETE FROM iteration_rank_states WHERE iteration_id = ? AND epoch = ? "
                        "AND rank = ?",
                        (iteration_id, epoch, rank),
                    )
            self._write_rows(tx, iteration_id, epoch, epoch_rows.rows, before)
            added = epoch_rows.added
            if added is not None:
                tx.run(
                    "INSERT INTO iteration_changes (iteration_id, version, epoch, kind, body, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (iteration_id, added.version, added.epoch, added.kind, added.body,
                     added.created_at),
                )  # fmt: skip
                tx.run(
                    "UPDATE iterations SET version = ? WHERE id = ?", (added.version, iteration_id)
                )
            return result

        return self._db.transaction(body, lock="rows")
