"""Iteration state rows: one per iteration, epoch and rank, changed in write transactions.

The catalog does not interpret the state (the iteration engine does, ``engine/state.py``):
it stores it as JSON text with two columns the servers query across iterations, when the
first lease of the row runs out (``expires_at``) and which servers serve its streams
(``nodes``, as ``,a,b,``). ``update_rank_states`` is the one way to change rows: it loads
them inside a write transaction that holds them, hands them to a function, and writes back
the ones it changed, so two servers never hand out the same sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..protocol.errors import IterationNotFound

if TYPE_CHECKING:
    from ._database import Database, Transaction

__all__ = ["NodeRecord", "ProgressRows", "RankRow", "VersionChanged"]

T = TypeVar("T")


class VersionChanged(Exception):
    """The iteration changed (weights, a deal) since the caller last looked: look again.

    Raised by ``update_rank_states`` when the version it was given is not the stored one;
    nothing was changed.
    """

    def __init__(self, iteration_id: str, version: int) -> None:
        super().__init__(f"iteration {iteration_id} is at version {version} now")
        self.version = version


@dataclass
class RankRow:
    """The stored state of one rank in one epoch (``state`` None: no row yet)."""

    epoch: int
    rank: int
    state: str | None
    expires_at: float | None = None
    nodes: tuple[str, ...] = ()
    updated_at: float = 0.0

    def set(self, state: str, expires_at: float | None, nodes: Sequence[str]) -> None:
        """Replace the state (written back when the transaction ends)."""
        self.state = state
        self.expires_at = expires_at
        self.nodes = tuple(nodes)


@dataclass(frozen=True)
class NodeRecord:
    """A server registered on the catalog."""

    id: str
    location: str
    started_at: float
    heartbeat_at: float
    info: str


def _nodes_text(nodes: Sequence[str]) -> str:
    return "," + ",".join(nodes) + "," if nodes else ""


def _nodes_of(text: str) -> tuple[str, ...]:
    return tuple(n for n in text.split(",") if n)


class ProgressRows:
    """The iteration-state half of ``Catalog`` (mixed in; uses its database)."""

    _db: Database

    def _query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def update_rank_states(
        self,
        iteration_id: str,
        epoch: int,
        ranks: Sequence[int],
        change: Callable[[dict[int, RankRow]], T],
        version: int | None = None,
    ) -> T:
        """Change the state rows of some ranks of one epoch, all in one transaction.

        ``change`` gets every asked rank's row (``state`` None where there is none yet) and
        may ``set`` them; changed rows are written back, and nothing is when it raises. It
        may run more than once (after a conflict between servers): it must change nothing
        but the rows it is given. With ``version``, the iteration must still be at that
        version (see ``change_epoch``), else ``VersionChanged`` is raised before ``change``.

        Raises:
            IterationNotFound: the iteration does not exist (or was deleted meanwhile).
            VersionChanged: ``version`` is not the iteration's version any more.
        """
        wanted = sorted(set(ranks))

        def body(tx: Transaction) -> T:
            share = " FOR SHARE" if tx.dialect.name == "postgresql" else ""
            found = tx.run("SELECT version FROM iterations WHERE id = ?" + share, (iteration_id,))
            if not found:
                raise IterationNotFound(f"no iteration with id {iteration_id!r}")
            if version is not None and int(found[0][0]) != version:
                raise VersionChanged(iteration_id, int(found[0][0]))
            rows = self._rows(tx, iteration_id, epoch, wanted)
            before = {rank: (row.state, row.expires_at, row.nodes) for rank, row in rows.items()}
            result = change(rows)
            self._write_rows(tx, iteration_id, epoch, rows, before)
            return result

        return self._db.transaction(body, lock="rows")

    @staticmethod
    def _write_rows(
        tx: Transaction,
        iteration_id: str,
        epoch: int,
        rows: dict[int, RankRow],
        before: dict[int, tuple[str | None, float | None, tuple[str, ...]]],
    ) -> None:
        """Write back the rows a change set (inserting those that had none)."""
        now = time.time()
        for rank, row in rows.items():
            old = before.get(rank, (None, None, ()))
            if row.state is None or (row.state, row.expires_at, row.nodes) == old:
                continue
            values = (row.state, row.expires_at, _nodes_text(row.nodes), now)
            if old[0] is None:
                tx.run(
                    "INSERT INTO iteration_rank_states (state, expires_at, nodes, updated_at, "
                    "iteration_id, epoch, rank) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*values, iteration_id, epoch, rank),
                )
            else:
                tx.run(
                    "UPDATE iteration_rank_states SET state = ?, expires_at = ?, nodes = ?, "
                    "updated_at = ? WHERE iteration_id = ? AND epoch = ? AND rank = ?",
                    (*values, iteration_id, epoch, rank),
                )
            row.updated_at = now

    @staticmethod
    def _rows(
        tx: Transaction, iteration_id: str, epoch: int, ranks: list[int]
    ) -> dict[int, RankRow]:
        """The asked rows, locked until the transaction ends (absent ones: state None)."""
        sql = (
            "SELECT rank, state, expires_at, nodes, updated_at FROM iteration_rank_states "
            "WHERE iteration_id = ? AND epoch = ?"
        )
        params: tuple[Any, ...] = (iteration_id, epoch)
        if len(ranks) == 1:
            sql += " AND rank = ?"
            params = (iteration_id, epoch, ranks[0])
        wanted = set(ranks)
        found: dict[int, RankRow] = {}
        for rank, state, expires_at, nodes, updated_at in tx.run(
            tx.dialect.for_update(sql), params
        ):
            if int(rank) in wanted:
                found[int(rank)] = RankRow(
                    epoch, int(rank), state, expires_at, _nodes_of(nodes), float(updated_at)
                )
        for rank in ranks:
            found.setdefault(rank, RankRow(epoch, rank, None))
        return found

    @staticmethod
    def _locked_rows(tx: Transaction, iteration_id: str, epoch: int) -> dict[int, RankRow]:
        """Every stored row of an epoch, locked until the transaction ends."""
        sql = (
            "SELECT rank, state, expires_at, nodes, updated_at FROM iteration_rank_states "
            "WHERE iteration_id = ? AND epoch = ?"
        )
        return {
            int(rank): RankRow(epoch, int(rank), state, x, _nodes_of(nodes), float(updated))
            for rank, state, x, nodes, updated in tx.run(
                tx.dialect.for_update(sql), (iteration_id, epoch)
            )
        }

    def load_rank_states(self, iteration_id: str, epoch: int | None = None) -> list[RankRow]:
        """The stored rows of an iteration (of one epoch, or all), by epoch and rank."""
        sql = (
            "SELECT epoch, rank, state, expires_at, nodes, updated_at "
            "FROM iteration_rank_states WHERE iteration_id = ?"
        )
        params: tuple[Any, ...] = (iteration_id,)
        if epoch is not None:
            sql += " AND epoch = ?"
            params = (iteration_id, epoch)
        return [
            RankRow(int(e), int(r), s, x, _nodes_of(n), float(u))
            for e, r, s, x, n, u in self._query(sql + " ORDER BY epoch, rank", params)
        ]

    def latest_rank_states(self, iteration_id: str) -> dict[int, RankRow]:
        """Each rank's row of the latest epoch it started."""
        latest: dict[int, RankRow] = {}
        for row in self.load_rank_states(iteration_id):
            latest[row.rank] = row  # rows come by epoch, so the last one wins
        return latest

    def rank_states_to_expire(
        self, now: float, dead_nodes: Sequence[str] = ()
    ) -> list[tuple[str, int, int]]:
        """``(iteration, epoch, rank)`` of rows with a lease run out or a dead node's stream."""
        sql = "SELECT iteration_id, epoch, rank FROM iteration_rank_states WHERE expires_at < ?"
        params: list[Any] = [now]
        for node in dead_nodes:
            sql += " OR nodes LIKE ?"
            params.append(f"%,{node},%")
        return [(str(i), int(e), int(r)) for i, e, r in self._query(sql, params)]

    # -- nodes ---------------------------------------------------------------------------

    def heartbeat_node(self, node_id: str, location: str, started_at: float, info: str) -> None:
        """Register a server, or say it is still alive."""

        def beat(tx: Transaction) -> None:
            sql = tx.dialect.upsert(
                "nodes", ("id", "location", "started_at", "heartbeat_at", "info"), key=("id",)
            )
            # the time of the write, not of the call: a call that waited out an outage of
            # the database must not record a beat that makes this server look dead
            tx.run(sql, (node_id, location, started_at, time.time(), info))

        self._db.transaction(beat, lock="rows")

    def list_nodes(self) -> list[NodeRecord]:
        """Every registered server, oldest first."""
        return [
            NodeRecord(str(i), str(loc), float(s), float(h), str(info))
            for i, loc, s, h, info in self._query(
                "SELECT id, location, started_at, heartbeat_at, info FROM nodes "
                "ORDER BY started_at, id"
            )
        ]

    def remove_node(self, node_id: str) -> None:
        """Forget a server (it stopped, or its heartbeat lapsed long ago)."""

        def remove(tx: Transaction) -> None:
            tx.run("DELETE FROM nodes WHERE id = ?", (node_id,))

        self._db.transaction(remove, lock="rows")
