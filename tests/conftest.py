"""Shared fixtures: a real catalog file, a real Flight server on a free port, a client on it,
and a real PostgreSQL (started once per session, a fresh database per test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.flight as flight
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.shutdown import stop_server
from tests.postgres import PostgresNotInstalled, PostgresServer

CALL_TIMEOUT = 30.0
SHUTDOWN_GRACE = 10.0
"""Seconds a test server's open calls get at teardown before their connections are cut."""


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    """A catalog in a fresh SQLite file."""
    cat = Catalog(tmp_path / "catalog.db")
    yield cat
    cat.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of Debian's binaries for the whole session (fails if not installed)."""
    try:
        server = PostgresServer.start()
    except PostgresNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.destroy()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's PostgreSQL (dropped after)."""
    name = postgres.create_database()
    yield postgres.url(name)
    postgres.drop_database(name)


@pytest.fixture
def service(catalog: Catalog) -> LavenderService:
    """The service over the fresh catalog, memory:// locations allowed (as ``--allow-memory``).

    Tests keep shards in memory:// freely; a real server refuses it unless told otherwise.
    """
    return LavenderService(catalog, allow_memory=True)


@pytest.fixture
def server(service: LavenderService) -> Iterator[LavenderFlightServer]:
    """A real Flight server on grpc://127.0.0.1:<free port>."""
    srv = LavenderFlightServer(service, "grpc://127.0.0.1:0")
    yield srv
    # as the CLI stops: bounded, so a failed test that left a stream open cannot hang the
    # whole run (pyarrow's shutdown alone waits for every call to end)
    assert stop_server(srv, SHUTDOWN_GRACE, say=lambda _: None), "the test server did not stop"


@pytest.fixture
def api_url(server: LavenderFlightServer) -> str:
    """The URL of the test server."""
    return f"grpc://127.0.0.1:{server.port}"


@pytest.fixture
def client(api_url: str, reset_client: None) -> LavenderClient:
    """The module-level client API initialised against the test server."""
    return lavender.init(api_url, timeout=CALL_TIMEOUT)


@pytest.fixture
def reset_client() -> Iterator[None]:
    """Close the module-level client a test opened with ``lavender.init`` (or failed to)."""
    yield None
    if lavender._client is not None:
        lavender._client.close()
    lavender._client = None
    lavender._failure = None


@pytest.fixture
def raw_flight(api_url: str) -> Iterator[flight.FlightClient]:
    """A plain pyarrow Flight client, as any Flight user would have."""
    conn = flight.connect(api_url)
    yield conn
    conn.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder for shard locations."""
    path = tmp_path / "data"
    path.mkdir()
    return path


def call_options() -> flight.FlightCallOptions:
    """Options with a timeout, so a hang fails the test instead of stalling CI."""
    return flight.FlightCallOptions(timeout=CALL_TIMEOUT)
