"""``python -m benchmarks.catalog_costs`` runs its cases on both backends (it broke once, when
the catalog's iteration records became typed and its tables changed, with no test noticing)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.catalog_costs import measure

CASES = 4


def test_the_cases_run_on_sqlite(tmp_path: Path) -> None:
    rows = measure("sqlite", str(tmp_path / "catalog.db"), 3)
    assert [backend for backend, _, _ in rows] == ["sqlite"] * CASES
    assert all(numbers["median"] > 0 and numbers["calls/s"] > 0 for _, _, numbers in rows)


def test_the_cases_run_on_postgresql(postgres_url: str) -> None:
    rows = measure("postgresql", postgres_url, 3)
    assert len(rows) == CASES and all(numbers["median"] > 0 for _, _, numbers in rows)
    assert any("FOR UPDATE" in case for _, case, _ in rows)
