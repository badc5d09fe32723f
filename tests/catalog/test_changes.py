"""Changes of a running iteration in the catalog (SQLite and PostgreSQL): a change and the rank
rows it rewrites land together under the next version; a state transaction that expects
another version changes nothing; a change waits for the state transactions under way."""

from __future__ import annotations

import threading
import time

import pytest

from lavender_flight.catalog import Catalog, EpochRows, VersionChanged
from lavender_flight.catalog._progress import RankRow
from lavender_flight.protocol.iterations import IterationPlan, IterationRecord, IterationSpec

JOIN_TIMEOUT = 30.0


def make_iteration(catalog: Catalog, iteration_id: str = "it-1") -> str:
    home = catalog.create_dataset(f"home-{iteration_id}", "uid")
    catalog.create_iteration(
        IterationRecord(
            id=iteration_id,
            dataset_id=home.id,
            spec=IterationSpec(dataset_id=home.id, batch_size=1),
            plan=IterationPlan(shards=[], seed=0),
            total=10,
            created_at=time.time(),
        )
    )
    return iteration_id


def set_rank(catalog: Catalog, iteration_id: str, rank: int, text: str, **kw: int) -> None:
    def change(rows: dict[int, RankRow]) -> None:
        rows[rank].set(text, None, ())

    catalog.update_rank_states(iteration_id, 0, [rank], change, **kw)


def test_a_change_rewrites_rows_and_bumps_the_version(catalog: Catalog) -> None:
    iteration_id = make_iteration(catalog)
    for rank in range(3):
        set_rank(catalog, iteration_id, rank, f"old {rank}")
    assert catalog.load_changes(iteration_id) == (0, [])

    def resize(rows: EpochRows) -> int:
        assert sorted(rows.rows) == [0, 1, 2] and not rows.later
        for rank in (0, 1):
            rows.row(rank).set(f"new {rank}", None, ())
        rows.drop(2)
        rows.add("deal", '{"world_size": 2}')
        return rows.version

    assert catalog.change_epoch(iteration_id, 0, resize) == 0
    version, changes = catalog.load_changes(iteration_id)
    assert version == 1
    assert [(c.version, c.epoch, c.kind, c.body) for c in changes] == [
        (1, 0, "deal", '{"world_size": 2}')
    ]
    rows = catalog.load_rank_states(iteration_id, 0)
    assert [(r.rank, r.state) for r in rows] == [(0, "new 0"), (1, "new 1")]
    # a state transaction of the old version is refused, changing nothing
    with pytest.raises(VersionChanged) as found:
        set_rank(catalog, iteration_id, 0, "late", version=0)
    assert found.value.version == 1
    set_rank(catalog, iteration_id, 0, "current", version=1)
    assert catalog.load_rank_states(iteration_id, 0)[0].state == "current"
    # a later epoch started: the change sees it
    catalog.update_rank_states(iteration_id, 1, [0], lambda rows: rows[0].set("e1", None, ()))
    assert catalog.change_epoch(iteration_id, 0, lambda rows: rows.later) is True
    catalog.delete_iteration(iteration_id)
    with pytest.raises(KeyError):
        catalog.load_changes(iteration_id)


def test_a_change_waits_for_a_state_transaction_under_way(catalog: Catalog) -> None:
    iteration_id = make_iteration(catalog, "it-2")
    set_rank(catalog, iteration_id, 0, "start")
    inside, release = threading.Event(), threading.Event()
    seen: list[str | None] = []

    def slow_claim(rows: dict[int, RankRow]) -> None:
        inside.set()
        assert release.wait(JOIN_TIMEOUT)
        rows[0].set("claimed", None, ())

    def claim() -> None:
        catalog.update_rank_states(iteration_id, 0, [0], slow_claim, version=0)

    def change(rows: EpochRows) -> None:
        seen.append(rows.rows[0].state)
        rows.add("weights", "{}")

    claimer = threading.Thread(target=claim)
    claimer.start()
    assert inside.wait(JOIN_TIMEOUT)
    changer = threading.Thread(target=lambda: catalog.change_epoch(iteration_id, 0, change))
    changer.start()
    time.sleep(0.3)
    assert seen == []  # held back by the claim in progress
    release.set()
    claimer.join(JOIN_TIMEOUT)
    changer.join(JOIN_TIMEOUT)
    assert seen[-1] == "claimed"  # it saw what the claim wrote
    assert catalog.load_changes(iteration_id)[0] == 1
