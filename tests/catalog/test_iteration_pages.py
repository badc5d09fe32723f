"""The iterations listing cut into pages by the catalog, on both backends."""

from __future__ import annotations

from lavender_flight.catalog import Catalog
from lavender_flight.protocol.iterations import IterationPlan, IterationRecord, IterationSpec


def add(catalog: Catalog, dataset_id: str, iteration_id: str, created_at: float) -> None:
    catalog.create_iteration(
        IterationRecord(
            id=iteration_id,
            dataset_id=dataset_id,
            spec=IterationSpec(dataset_id=dataset_id, batch_size=4),
            plan=IterationPlan(shards=[(0, 10)], seed=7),
            total=10,
            created_at=created_at,
        )
    )


def test_pages_newest_first_in_a_fixed_order(catalog: Catalog) -> None:
    one = catalog.create_dataset("one", "uid").id
    two = catalog.create_dataset("two", "uid").id
    add(catalog, one, "it-a", 1.0)
    add(catalog, two, "it-b", 2.0)
    add(catalog, one, "it-c", 3.0)
    add(catalog, one, "it-d", 3.0)  # the same instant: by id, so pages never overlap
    add(catalog, one, "it-e", 4.0)

    def ids(dataset_id: str | None = None, offset: int = 0, limit: int | None = None) -> list:
        return [r.id for r in catalog.list_iterations(dataset_id, offset=offset, limit=limit)]

    assert ids() == ["it-e", "it-d", "it-c", "it-b", "it-a"]
    assert ids(limit=2) == ["it-e", "it-d"]
    assert ids(offset=2, limit=2) == ["it-c", "it-b"]
    assert ids(offset=4, limit=2) == ["it-a"]
    assert ids(offset=3) == ["it-b", "it-a"]
    assert ids(one, offset=1, limit=2) == ["it-d", "it-c"]
    assert ids(two) == ["it-b"]
    assert ids(offset=10, limit=3) == []
