"""The catalog's own failures said plainly: a full disk, a file deleted under a running server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.catalog._dialect import SQLiteDialect
from lavender_flight.protocol.errors import StorageError


class TinyDisk(SQLiteDialect):
    """A disk that fills up: SQLite's page limit makes writes fail as on a full disk."""

    pages = 0

    def connect(self) -> Any:
        conn = super().connect()
        if self.pages:
            with conn.cursor() as cur:
                cur.execute(f"PRAGMA max_page_count={self.pages}")
        return conn


def test_a_full_disk_says_so_and_nothing_changes(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.db")
    dialect = TinyDisk(catalog._db.dialect.target)
    catalog._db.close()
    catalog._db.dialect = dialect
    catalog.create_dataset("before", "uid")
    dialect.pages = int(catalog._db.query("PRAGMA page_count")[0][0])
    catalog._db.close()  # new connections get the limit
    with pytest.raises(StorageError, match=r"^the catalog's disk is full \(.*catalog.db\)"):
        for number in range(2000):  # until the next page is needed
            catalog.create_dataset(f"d{number:04d}" + "x" * 200, "uid")
    names = [d.name for d in catalog.list_datasets()]
    assert names[0] == "before" and len(names) < 2001
    catalog.close()


def test_a_catalog_file_deleted_under_a_running_server_says_so(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    catalog = Catalog(path)
    catalog.create_dataset("kept", "uid")
    catalog._db.close()  # the next call opens a new connection, as a new server thread does
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(StorageError, match=r"^the catalog file .*catalog.db is gone") as gone:
        catalog.list_datasets()
    assert "\n" not in str(gone.value)
    assert not path.exists()  # no empty catalog made in its place
    catalog.close()
