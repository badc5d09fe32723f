"""The catalog tests run on both backends: a SQLite file and a real PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lavender_flight.catalog import Catalog, open_catalog


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """What ``--catalog`` would say: a fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "catalog.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def catalog(catalog_target: str, tmp_path: Path) -> Iterator[Catalog]:
    """A fresh catalog on each backend (overrides the SQLite-only one of tests/conftest.py)."""
    cat = open_catalog(catalog_target, local_dir=tmp_path)
    yield cat
    cat.close()
