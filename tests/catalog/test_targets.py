"""Which database a ``--catalog`` setting opens; URLs are never taken for file names and
passwords are never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from lavender_flight.catalog import mask_url, open_catalog, parse_target
from lavender_flight.flight_server.settings import ServerSettings
from lavender_flight.protocol.errors import InvalidArgument


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{abs}/c.db", "{abs}/c.db"),
        ("sqlite:///{abs}/abs.db", "{abs}/abs.db"),  # {abs} starts with "/": sqlite:////tmp/...
        ("file://{abs}/f.db", "{abs}/f.db"),
        ("file://localhost{abs}/f.db", "{abs}/f.db"),
        ("sqlite:///rel.db", "{abs}/rel.db"),
        ("file:rel.db", "{abs}/rel.db"),
        ("rel.db", "{abs}/rel.db"),
        ("mysql:no-slashes.db", "{abs}/mysql:no-slashes.db"),  # no "//": a file name like any
    ],
)
def test_sqlite_forms(
    text: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    target = parse_target(text.format(abs=tmp_path.resolve()))
    assert target.backend == "sqlite"
    assert target.location == expected.format(abs=tmp_path.resolve())
    assert target.label == target.location


def test_a_sqlite_url_opens_that_file(tmp_path: Path) -> None:
    catalog = open_catalog(f"sqlite:///{tmp_path}/via-url.db")
    catalog.create_dataset("d", "uid")
    catalog.close()
    assert (tmp_path / "via-url.db").is_file()
    again = open_catalog(tmp_path / "via-url.db")
    assert [d.name for d in again.list_datasets()] == ["d"]
    again.close()


@pytest.mark.parametrize(
    "text, label",
    [
        ("postgresql://lf@db.example:5433/cat", "postgresql://lf@db.example:5433/cat"),
        ("postgres://lf:s3cret@db/cat", "postgres://lf:***@db/cat"),
        (
            "postgresql://lf@db/cat?password=s3cret&sslmode=require",
            "postgresql://lf@db/cat?password=***&sslmode=require",
        ),
        ("POSTGRESQL://lf:s3cret@[::1]:5432/cat", "postgresql://lf:***@[::1]:5432/cat"),
    ],
)
def test_postgresql_urls_and_their_masked_labels(text: str, label: str) -> None:
    target = parse_target(text)
    assert target.backend == "postgresql"
    scheme, rest = text.split(":", 1)
    assert target.location == f"{scheme.lower()}:{rest}"
    assert target.label == label
    assert "s3cret" not in repr(target)
    assert mask_url(text) == label


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("mysql://u:s3cret@host/db", "unsupported catalog 'mysql://u:***@host/db' (mysql://)"),
        ("s3://bucket/catalog.db", "unsupported catalog 's3://bucket/catalog.db' (s3://)"),
        ("https://example.org/c.db", "(https://)"),
        ("postgresql+psycopg://u@h/db", "(postgresql+psycopg://)"),
        ("sqlite://host/c.db", "SQLite URLs are sqlite:///relative.db"),
        ("sqlite:c.db", "SQLite URLs are sqlite:///relative.db"),
        ("file://elsewhere/c.db", "file URLs are file:///absolute.db"),
        ("sqlite:///c.db?mode=ro", "SQLite catalogs take none"),
        ("postgresql:db", "PostgreSQL URLs are postgresql://user@host:port/database"),
        ("  ", "the catalog setting is empty"),
    ],
)
def test_unsupported_catalogs_are_refused_in_one_line(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        open_catalog(text)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message and "s3cret" not in message
    if "unsupported" in fragment:
        assert "postgresql://user@host:port/database" in message
        assert "sqlite:///relative.db" in message


def test_settings_name_the_catalog_without_showing_a_password(tmp_path: Path) -> None:
    default = ServerSettings(data_home=tmp_path)
    assert default.catalog_target == str(tmp_path.resolve() / "catalog.db")
    assert default.catalog_path == tmp_path.resolve() / "catalog.db"
    assert ServerSettings(catalog="~/x.db").catalog_path == Path("~/x.db").expanduser()
    url = "postgresql://lf:s3cret@db:5432/cat"
    remote = ServerSettings(catalog=url)
    assert remote.catalog_target == url
    assert "s3cret" not in repr(remote) and "s3cret" not in str(remote)
    with pytest.raises(InvalidArgument, match=r"postgresql://lf:\*\*\*@db:5432/cat is postgresql"):
        _ = remote.catalog_path


def test_the_catalog_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAVENDER_FLIGHT_CATALOG", "postgresql://lf@db/cat")
    assert ServerSettings().catalog_target == "postgresql://lf@db/cat"
