"""Several ``lavender-flight serve`` nodes on one catalog, as on several machines: real server
processes (each in a network namespace of its own where this machine allows it), real client
processes, a real PostgreSQL; nodes SIGKILLed, restarted, the database restarted under them.
Every sample is delivered, none twice, nothing acknowledged is sent again."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.client.settings import ClientSettings
from lavender_flight.protocol.errors import IterationNotFound, ServerUnavailable
from tests.client.test_resume import write_dataset
from tests.cluster import Cluster, netns_available, postgres_socket_url
from tests.postgres import PostgresServer

pytestmark = pytest.mark.slow

LOOP = Path(__file__).with_name("cluster_loop.py")
LOOP_TIMEOUT = 120.0
NETNS = netns_available()


@pytest.fixture
def pg_database(postgres: PostgresServer) -> Iterator[str]:
    """A fresh database on the session's PostgreSQL (its name; dropped after)."""
    name = postgres.create_database()
    yield name
    postgres.drop_database(name)


@pytest.fixture
def pg_cluster(postgres: PostgresServer, pg_database: str, tmp_path: Path) -> Iterator[Cluster]:
    """Nodes on PostgreSQL, in namespaces of their own when possible (none started yet)."""
    catalog = postgres_socket_url(postgres, pg_database) if NETNS else postgres.url(pg_database)
    cluster = Cluster(catalog, tmp_path / "home", netns=NETNS)
    yield cluster
    cluster.close()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def completed(iteration_id: str) -> int:
    try:
        return lavender.get_iteration(iteration_id).completed
    except (ServerUnavailable, IterationNotFound):  # the loops have not made it yet
        return 0


class Loops:
    """Client processes, one per rank, running ``cluster_loop.py``."""

    def __init__(self, urls: list[str], **args: Any) -> None:
        self.processes = [
            subprocess.Popen(
                [sys.executable, str(LOOP), json.dumps({"urls": urls, "rank": rank, **args})],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(args["world_size"])
        ]

    def check(self) -> None:
        """Fail at once, with its stderr, when a loop exited with an error."""
        for process in self.processes:
            if process.poll() not in (None, 0):
                _, err = process.communicate(timeout=LOOP_TIMEOUT)
                pytest.fail(f"a loop failed ({process.returncode}): {err[-3000:]}")

    def completed(self, iteration_id: str) -> int:
        """Samples completed so far (0 before the loops made the iteration)."""
        self.check()
        return completed(iteration_id)

    def results(self) -> list[dict[str, Any]]:
        found = []
        for process in self.processes:
            out, err = process.communicate(timeout=LOOP_TIMEOUT)
            assert process.returncode == 0, err[-3000:]
            found.append({**json.loads(out.strip().splitlines()[-1]), "stderr": err})
        return found

    def kill(self) -> None:
        """Kill the loops still running; close every pipe."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=LOOP_TIMEOUT)


def check_delivery(results: list[dict[str, Any]], total: int) -> None:
    """Every sample once over all loops; nothing recorded as completed sent again."""
    every = [u for r in results for u in r["uids"]]
    twice = [u for u, n in Counter(every).items() if n > 1]
    assert not twice, f"{len(twice)} samples reached a loop twice"
    assert sorted(every) == list(range(total)), f"{total - len(set(every))} samples lost"
    assert sum(r["resent_recorded"] for r in results) == 0, "acknowledged samples sent again"


def test_four_ranks_on_three_nodes_ride_out_a_killed_and_a_restarted_node(
    pg_cluster: Cluster, reset_client: None, tmp_path: Path
) -> None:
    total, ranks, batch = 8000, 4, 25
    urls = [pg_cluster.start() for _ in range(3)]
    lavender.init(api_url=urls, timeout=10)
    dataset_id = write_dataset("cluster", tmp_path / "data", shards=8, rows=total // 8)
    loops = Loops(
        urls, dataset_id=dataset_id, iteration_id="cluster", world_size=ranks,
        batch_size=batch, seed=11, pause=0.08,
    )  # fmt: skip
    try:
        wait_until(lambda: loops.completed("cluster") >= total // 4, 60, "a quarter is done")
        pg_cluster.kill(0)  # the oldest node: ranks 0 and 3 start there
        at_kill = completed("cluster")
        wait_until(
            lambda: not {n.location: n.alive for n in lavender.list_nodes()}[urls[0]],
            pg_cluster.node_timeout * 3 + 5,
            "the killed node's heartbeat lapsed",
        )
        wait_until(lambda: loops.completed("cluster") >= total * 6 // 10, 60, "60% is done")
        assert pg_cluster.stop(1) == 0  # an operator restarts another one
        pg_cluster.start(1)
        results = loops.results()
    finally:
        loops.kill()
    check_delivery(results, total)
    resent = {r["rank"]: r["resent"] for r in results}
    print(
        f"\n{'network namespaces' if NETNS else 'loopback'}: 3 nodes, {ranks} ranks, "
        f"{total} samples; node 0 killed at {at_kill} completed, node 1 restarted; samples "
        f"sent again by rank (not delivered twice): {resent}; loops took "
        f"{max(r['seconds'] for r in results):.1f} s"
    )
    assert sum(resent.values()) <= 4 * 16 * batch  # at most a read-ahead window per rank
    assert [r["first_location"] for r in results] == [urls[r % 3] for r in range(ranks)]
    progress = lavender.get_iteration("cluster")
    assert (progress.completed, progress.done) == (total, True)
    alive = sorted(n.location for n in lavender.list_nodes() if n.alive)
    assert alive == sorted(urls[1:])


def test_postgresql_restarted_mid_epoch_the_nodes_reconnect_and_nothing_is_lost(
    pg_cluster: Cluster, postgres: PostgresServer, reset_client: None, tmp_path: Path
) -> None:
    total, ranks = 4000, 2
    urls = [pg_cluster.start() for _ in range(2)]
    lavender.init(api_url=urls, timeout=10)
    dataset_id = write_dataset("pg-restart", tmp_path / "data", shards=4, rows=total // 4)
    loops = Loops(
        urls, dataset_id=dataset_id, iteration_id="pg-restart", world_size=ranks,
        batch_size=20, seed=5, pause=0.04,
    )  # fmt: skip
    try:
        wait_until(lambda: loops.completed("pg-restart") >= total // 4, 60, "a quarter is done")
        postgres.stop()  # -m fast: every session of the nodes is cut
        time.sleep(3)  # longer than the nodes' heartbeat timeout
        postgres.start_again()
        results = loops.results()
    finally:
        loops.kill()
        if not (postgres.data / "postmaster.pid").exists():
            postgres.start_again()
    check_delivery(results, total)
    print(f"\nPostgreSQL restarted: samples sent again {[r['resent'] for r in results]}")
    progress = lavender.get_iteration("pg-restart")
    assert (progress.completed, progress.done) == (total, True)
    assert all(n.alive for n in lavender.list_nodes())  # both nodes beat again


def test_two_servers_on_one_sqlite_file_share_a_rank_between_two_clients(
    reset_client: None, tmp_path: Path
) -> None:
    total = 3000
    cluster = Cluster(str(tmp_path / "home" / "catalog.db"), tmp_path / "home", netns=False)
    try:
        urls = [cluster.start(), cluster.start()]
        lavender.init(urls[0], timeout=10)
        dataset_id = write_dataset("shared-rank", tmp_path / "data", shards=3, rows=total // 3)
        got: list[list[int]] = [[], []]
        errors: list[BaseException] = []

        def loop(index: int) -> None:
            client = LavenderClient(ClientSettings(urls[index], timeout=10))
            try:
                iteration = PinnedIteration.from_dataset(
                    dataset_id, batch_size=20, shuffle=True, shuffle_seed=2,
                    iteration_id="shared", client=client,
                )  # fmt: skip
                for batch in iteration:
                    got[index].extend(batch["uid"])
                    time.sleep(0.01)
            except BaseException as exc:
                errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LOOP_TIMEOUT)
        assert not errors, errors
        assert got[0] and got[1], f"one client got nothing: {len(got[0])}, {len(got[1])}"
        assert not set(got[0]) & set(got[1]), "a sample reached both clients"
        assert sorted(got[0] + got[1]) == list(range(total))
        progress = lavender.get_iteration("shared")
        assert (progress.completed, progress.done) == (total, True)
    finally:
        cluster.close()


class PinnedIteration(Iteration):
    """Streams through its own client's server only (one client per server, on purpose)."""

    @property
    def locations(self) -> list[str]:
        return [self.client.api_url]
