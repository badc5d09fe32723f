"""``lavender-flight serve --catalog ...`` as a user runs it: a real server process on a real
PostgreSQL, its banner masking the password; an unsupported URL refused in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lavender_flight.catalog import open_catalog
from lavender_flight.client import api as lavender
from tests.flight_server.test_cli import (  # noqa: F401  (launch is a fixture)
    Launcher,
    clean_env,
    launch,
    lavender_flight_command,
    run_quickly,
    stop_cleanly,
)

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-pw"  # trust authentication ignores it; it must never be shown


def test_serve_on_postgresql_masks_the_password(
    launch: Launcher,  # noqa: F811
    reset_client: None,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    url = postgres_url.replace("postgres@", f"postgres:{PASSWORD}@")
    masked = url.replace(PASSWORD, "***")
    env = clean_env(LAVENDER_FLIGHT_CATALOG=url)
    served = launch(
        [*lavender_flight_command(), "serve", "--no-ui", "--port", "0", "--data-home",
         str(tmp_path)],
        env=env,
    )  # fmt: skip
    address = served.wait_until_serving()
    served.wait_for(re.compile(re.escape(f"  catalog  {masked} (0 datasets, 0 samples)")))
    lavender.init(address, timeout=10)
    lavender.create_dataset("on-postgres", uid_column_name="uid")
    stop_cleanly(served)
    assert PASSWORD not in served.stderr
    assert not (tmp_path / "catalog.db").exists()  # no SQLite file on the side
    catalog = open_catalog(postgres_url)
    assert [d.name for d in catalog.list_datasets()] == ["on-postgres"]
    catalog.close()


@pytest.mark.parametrize("catalog", ["mysql://u:s3cret@db/cat", "s3://bucket/catalog.db"])
def test_serve_refuses_an_unsupported_catalog_in_one_line(catalog: str, tmp_path: Path) -> None:
    done = run_quickly(
        [*lavender_flight_command(), "serve", "--no-ui", "--port", "0", "--catalog", catalog,
         "--data-home", str(tmp_path)]
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    scheme = catalog.split(":", 1)[0]
    assert done.stderr.strip().splitlines() == [
        f"lavender-flight: error: unsupported catalog "
        f"'{catalog.replace('s3cret', '***')}' ({scheme}://): give a file path or "
        "sqlite:///relative.db, sqlite:////absolute.db, file:///absolute.db (SQLite); "
        "postgresql://user@host:port/database (PostgreSQL)"
    ]
    assert not list(tmp_path.iterdir()), "a refused catalog still created files"
