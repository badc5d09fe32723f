"""Several servers on one catalog, in this process: every ``get_flight_info`` lists the live
servers in each endpoint's locations (ranks and shards spread over them, the same answer from
each), a plain Flight client reads a dataset from them, a client given several URLs fails
over, and a loop whose server stops goes on at the next location."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import endpoint_locations
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.protocol import wire
from lavender_flight.protocol.errors import ServerUnavailable
from lavender_flight.protocol.iterations import IterationCommand
from tests.client.test_resume import write_dataset
from tests.conftest import CALL_TIMEOUT, call_options
from tests.postgres import free_port

NODE_TIMEOUT = 1.0


class Node:
    """One server of the test's service: its own catalog connection, service and port."""

    def __init__(self, path: Path) -> None:
        self.catalog = Catalog(path)
        self.server = LavenderFlightServer(
            LavenderService(self.catalog, allow_memory=True),
            "grpc://127.0.0.1:0",
            node_timeout=NODE_TIMEOUT,
        )
        self.url = f"grpc://127.0.0.1:{self.server.port}"
        self.running = True

    def stop(self) -> None:
        """Stop as ``lavender-flight serve`` does: park the streams, then shut down."""
        if self.running:
            self.running = False
            self.server.iterations.park()
            self.server.shutdown()
            self.catalog.close()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    """Three servers on one SQLite catalog file, started one after the other (oldest first)."""
    started: list[Node] = []
    for _ in range(3):
        started.append(Node(tmp_path / "catalog.db"))
        time.sleep(0.05)  # distinct start times: the catalog orders servers by them
    yield started
    for node in started:
        node.stop()


def rotated(urls: list[str], start: int) -> list[str]:
    start %= len(urls)
    return urls[start:] + urls[:start]


def info_of(url: str, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
    """``get_flight_info`` through a plain pyarrow client, as any Flight user asks it."""
    with flight.connect(url) as conn:
        return conn.get_flight_info(descriptor, call_options())


def wait_for_locations(url: str, descriptor: flight.FlightDescriptor, expected: list[str]) -> None:
    deadline = time.monotonic() + 10
    while True:
        found = endpoint_locations(info_of(url, descriptor).endpoints[0])
        if found == expected or time.monotonic() > deadline:
            assert found == expected
            return
        time.sleep(0.1)


def test_endpoints_list_the_live_servers_so_ranks_spread(
    nodes: list[Node], reset_client: None, tmp_path: Path
) -> None:
    urls = [n.url for n in nodes]
    lavender.init(urls[0], timeout=CALL_TIMEOUT)
    dataset_id = write_dataset("spread", tmp_path / "data", shards=4, rows=50)
    made = Iteration.from_dataset(
        dataset_id, batch_size=10, world_size=4, rank=0, iteration_id="spread-it"
    )
    assert made.id == "spread-it"  # created on the server
    command = wire.encode(IterationCommand(iteration_id="spread-it"))
    iteration = flight.FlightDescriptor.for_command(command)
    dataset = flight.FlightDescriptor.for_path("spread")
    for url in urls:  # every server answers the same spread
        ranks = info_of(url, iteration).endpoints
        assert [endpoint_locations(e) for e in ranks] == [rotated(urls, r) for r in range(4)]
        shards = info_of(url, dataset).endpoints
        assert [endpoint_locations(e) for e in shards] == [rotated(urls, s) for s in range(4)]

    # a plain Flight client reads each shard from its endpoint's first location
    tables = []
    for endpoint in info_of(urls[2], dataset).endpoints:
        with flight.connect(endpoint_locations(endpoint)[0]) as conn:
            tables.append(conn.do_get(endpoint.ticket, call_options()).read_all())
    assert sorted(pa.concat_tables(tables)["uid"].to_pylist()) == list(range(200))

    nodes[1].stop()  # a server that leaves is no location any more (within a second)
    for url in (urls[0], urls[2]):
        wait_for_locations(url, iteration, [urls[0], urls[2]])
    ranks = info_of(urls[2], iteration).endpoints
    assert [endpoint_locations(e)[0] for e in ranks] == [urls[0], urls[2], urls[0], urls[2]]


def test_a_client_given_several_urls_fails_over_to_one_that_answers(
    nodes: list[Node], reset_client: None, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"grpc://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="lavender_flight.client"):
        client = lavender.init(api_url=[dead, nodes[1].url, nodes[2].url], timeout=5)
        assert lavender.list_datasets() == []
    assert client.api_url == nodes[1].url  # the first that answered is kept
    assert f"the server at {nodes[1].url} answers now ({dead} did not)" in caplog.text
    nodes[1].stop()
    lavender.create_dataset("after-failover", uid_column_name="uid")  # on to the next URL
    assert client.api_url == nodes[2].url
    assert [d.name for d in lavender.list_datasets()] == ["after-failover"]

    gone = f"grpc://127.0.0.1:{free_port()}"
    lavender.init(api_url=[dead, gone], timeout=5)
    with pytest.raises(ServerUnavailable) as failed:
        lavender.list_datasets()
    message = str(failed.value)
    assert message.startswith(f"none of the 2 servers ({dead}, {gone}) answered; the last: ")
    assert "\n" not in message


def test_a_loop_whose_server_stops_goes_on_at_the_next_location(
    nodes: list[Node], reset_client: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    total, batch_size = 2000, 20
    lavender.init(nodes[2].url, timeout=CALL_TIMEOUT, reconnect_seconds=20)
    dataset_id = write_dataset("moves", tmp_path / "data", shards=4, rows=total // 4)
    iteration = Iteration.from_dataset(
        dataset_id, batch_size=batch_size, shuffle=True, shuffle_seed=3, iteration_id="moves"
    )
    assert iteration.locations[:3] == [n.url for n in nodes]  # rank 0 starts at the oldest
    delivered: list[int] = []
    stopper: threading.Thread | None = None
    with caplog.at_level(logging.WARNING, logger="lavender_flight.client"):
        for count, batch in enumerate(iteration):
            delivered.extend(batch["uid"])
            if count == 10:  # mid-epoch, the rank's server stops
                stopper = threading.Thread(target=nodes[0].stop)
                stopper.start()
            time.sleep(0.002)
    assert stopper is not None
    assert f"lost the server at {nodes[0].url}" in caplog.text
    assert f"reconnected to {nodes[1].url}: moves goes on" in caplog.text
    stopper.join(CALL_TIMEOUT)
    twice = [u for u, n in Counter(delivered).items() if n > 1]
    assert not twice, f"{len(twice)} samples delivered twice"
    assert sorted(delivered) == list(range(total))
    progress = lavender.get_iteration("moves")
    assert (progress.completed, progress.done) == (total, True)
