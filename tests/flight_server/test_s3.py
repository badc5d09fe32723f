"""S3 shardsets against a real S3 API server on loopback (moto's standalone server).

The moto server runs in its own process, started here on a port it picks itself; the fault
tests freeze it (SIGSTOP) to make it stop answering, then let it go on (SIGCONT). The AWS
environment is replaced for every test, so nothing here can reach real AWS.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
import s3fs

from lavender_flight.catalog import Catalog
from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.settings import ServerSettings
from lavender_flight.flight_server.storage import RetryPolicy, is_transient
from lavender_flight.protocol import Dataset
from lavender_flight.protocol.errors import ShardNotFound, StorageError
from tests.conftest import CALL_TIMEOUT, call_options

pytestmark = pytest.mark.s3

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# short enough for the fault tests to be quick, long enough for a loaded 2-core machine
FAST_FAILING = {"config_kwargs": {"connect_timeout": 1, "read_timeout": 1}}
RETRY = RetryPolicy(attempts=4, first_delay=0.1, max_delay=0.5, deadline=15.0)
COLUMNS = [
    lavender.DatasetColumnOptions(name="uid", type_="int"),
    lavender.DatasetColumnOptions(name="text", type_="str"),
]


# -- the S3 server --------------------------------------------------------------------------


@dataclass
class MotoServer:
    """moto's S3 API server in a subprocess, on a port it chose."""

    process: subprocess.Popen[str]
    endpoint: str = ""
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=50))
    drainer: threading.Thread | None = None

    @classmethod
    def start(cls) -> MotoServer:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        server = cls(process)
        found = threading.Event()

        def drain() -> None:  # werkzeug logs every request: keep the pipe from filling up
            assert process.stderr is not None
            for line in process.stderr:
                server.lines.append(line.rstrip())
                match = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
                if match and not found.is_set():
                    server.endpoint = match.group(1)
                    found.set()

        server.drainer = threading.Thread(target=drain, daemon=True)
        server.drainer.start()
        if not found.wait(START_TIMEOUT):
            server.stop()
            pytest.fail("moto did not start:\n" + "\n".join(server.lines))
        return server

    def pause(self) -> None:
        """Stop answering: requests hang until ``resume``."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def resume_after(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self.resume)
        timer.start()
        return timer

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        if self.drainer is not None:
            self.drainer.join(timeout=STOP_TIMEOUT)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials, no profile, no instance metadata: nothing here can reach real AWS."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """One S3 server for the module (each test has its own bucket)."""
    server = MotoServer.start()
    yield server
    server.stop()


@pytest.fixture
def moto_alone() -> Iterator[MotoServer]:
    """An S3 server of the test's own, for the tests that freeze it."""
    server = MotoServer.start()
    yield server
    server.stop()


def uploader(endpoint: str) -> s3fs.S3FileSystem:
    """What a user would upload with: plain s3fs, its own instance."""
    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def new_bucket(endpoint: str) -> str:
    name = f"lf-{uuid.uuid4().hex[:12]}"
    uploader(endpoint).mkdir(name)
    return name


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    return new_bucket(moto.endpoint)


@pytest.fixture
def service(catalog: Catalog, moto: MotoServer) -> LavenderService:
    """The service as ``serve --s3-endpoint-url <moto>`` builds it (overrides conftest's)."""
    settings = ServerSettings(s3_endpoint_url=moto.endpoint)
    return LavenderService(catalog, storage_defaults=settings.storage_defaults(), retry=RETRY)


def write_rows(dataset_id: str, shardset_id: str, shards: int, rows: int) -> None:
    writer = Writer.get(dataset_id=dataset_id, shardset_id=shardset_id)
    for index in range(shards):
        uids = range(index * rows, (index + 1) * rows)
        writer.write([{"uid": u, "text": f"sample {u}"} for u in uids], shard_index=index)


def text_dataset(location: str, shards: int, rows: int, **options: Any) -> Dataset:
    dataset = lavender.create_dataset(f"ds-{uuid.uuid4().hex[:8]}")
    shardset = lavender.create_shardset(
        dataset.id, location, COLUMNS, storage_options=options or None
    )
    write_rows(dataset.id, shardset.id, shards, rows)
    return lavender.get_dataset(dataset_id=dataset.id)


def uids(iteration: Iteration) -> list[int]:
    return [u for batch in iteration for u in batch["uid"]]


# -- create, write, sync, iterate -------------------------------------------------------


def test_write_sync_and_iterate_with_shuffle_and_join(
    client: LavenderClient, moto: MotoServer, bucket: str
) -> None:
    dataset = lavender.create_dataset("s3-text")
    main = lavender.create_shardset(dataset.id, f"s3://{bucket}/text/", COLUMNS)
    assert main.location == f"s3://{bucket}/text"
    write_rows(dataset.id, main.id, shards=6, rows=50)
    features = lavender.create_shardset(
        dataset.id,
        f"s3://{bucket}/length",
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="length", type_="int32"),
        ],
    )
    Writer.get(dataset_id=dataset.id, shardset_id=features.id).write(
        [{"uid": u, "length": len(f"sample {u}")} for u in range(300)]
    )

    # the shards are objects in the bucket, as anyone with the bucket would see them
    s3 = uploader(moto.endpoint)
    assert sorted(Path(p).name for p in s3.ls(f"{bucket}/text")) == [
        f"shard.{i:08d}.parquet" for i in range(6)
    ]
    # a shard uploaded by other means is registered by a sync
    sink = io.BytesIO()
    pq.write_table(
        pa.table(
            {"uid": pa.array(range(300, 320)), "text": [f"sample {u}" for u in range(300, 320)]}
        ),
        sink,
    )
    s3.pipe_file(f"{bucket}/text/late.parquet", sink.getvalue())
    synced = lavender.sync_shardset(dataset.id, main.id)
    assert [(s.index, s.location, s.num_rows) for s in synced.added] == [
        (6, f"s3://{bucket}/text/late.parquet", 20)
    ]
    assert (synced.shard_count, synced.total_samples) == (7, 320)

    def epoch(seed: int) -> list[dict[str, Any]]:
        iteration = Iteration.from_dataset(
            dataset.id, batch_size=32, shuffle=True, shuffle_seed=seed, shuffle_block_size=2
        )
        return [
            {"uid": u, "text": t, "length": n}
            for batch in iteration
            for u, t, n in zip(batch["uid"], batch["text"], batch["length"], strict=True)
        ]

    first = epoch(7)
    assert sorted(row["uid"] for row in first) == list(range(320))
    assert [row["uid"] for row in first] != list(range(320))
    assert all(row["text"] == f"sample {row['uid']}" for row in first)
    # joined by uid: the late shard has no features, so its length is null
    assert all(row["length"] == (len(row["text"]) if row["uid"] < 300 else None) for row in first)
    assert [row["uid"] for row in epoch(7)] == [row["uid"] for row in first]
    assert [row["uid"] for row in epoch(8)] != [row["uid"] for row in first]


def test_sync_registers_more_than_a_thousand_objects(
    client: LavenderClient, service: LavenderService, moto: MotoServer, bucket: str
) -> None:
    dataset = lavender.create_dataset("many")
    shardset = lavender.create_shardset(dataset.id, f"s3://{bucket}/many", COLUMNS)
    assert shardset.shard_count == 0
    objects = {
        f"{bucket}/many/part-{i:05d}.csv": f"uid,text\n{i},t{i}\n".encode() for i in range(1100)
    }
    uploader(moto.endpoint).pipe(objects)  # s3fs sends them side by side
    requests = count_requests(service, f"s3://{bucket}/many")

    started = time.monotonic()
    result = lavender.sync_shardset(dataset.id, shardset.id)
    took = time.monotonic() - started
    assert len(result.added) == 1100
    assert requests["ListObjectsV2"] == 2  # S3 answers 1,000 keys a page
    assert (result.shard_count, result.total_samples) == (1100, 1100)
    shards = lavender.list_shards(dataset.id, shardset.id)
    assert [s.index for s in shards] == list(range(1100))
    assert shards[1099].location == f"s3://{bucket}/many/part-01099.csv"
    tail = lavender.preview_dataset(dataset.id, offset=1095, limit=10)
    assert tail.to_pydict() == {
        "uid": [1095, 1096, 1097, 1098, 1099],
        "text": ["t1095", "t1096", "t1097", "t1098", "t1099"],
    }
    again = lavender.sync_shardset(dataset.id, shardset.id)
    assert (again.added, again.updated, again.removed) == ([], [], [])
    assert took < 30, f"syncing 1,100 small objects took {took:.1f}s"


# -- zero disk ------------------------------------------------------------------------------


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_WRITING_EVENTS = {
    "os.rename",
    "os.replace",
    "os.remove",
    "os.mkdir",
    "os.truncate",
    "os.link",
    "os.symlink",
    "shutil.copyfile",
    "shutil.move",
    "tempfile.mkstemp",
    "tempfile.mkdtemp",
}
_watchers: list[DiskWatch] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _watchers:
        return
    if event == "open":
        path, mode, flags = [*args, None, None][:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
        )
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            for watcher in _watchers:
                watcher.saw(f"open for writing {os.fsdecode(path)}")
    elif event in _WRITING_EVENTS:
        for watcher in _watchers:
            watcher.saw(f"{event} {args!r}")


_hooked: list[bool] = []


class DiskWatch:
    """Every file this process writes while on: Python's audit events, plus the files its
    native code (Arrow, gRPC, SQLite) holds open for writing, sampled from /proc/self/fd."""

    def __init__(self, allowed: Callable[[str], bool]) -> None:
        self.allowed = allowed
        self.writes: list[str] = []
        self._stop = threading.Event()
        self._baseline: set[str] = set()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def saw(self, what: str) -> None:
        path = what.split(" ", 3)[-1]
        if not self.allowed(path):
            self.writes.append(what)

    @staticmethod
    def _open_for_writing() -> set[str]:
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    flags = int(info.read().split("flags:")[1].split()[0], 8)
            except (OSError, IndexError, ValueError):
                continue
            if target.startswith("/") and flags & (os.O_WRONLY | os.O_RDWR):
                found.add(target)
        return found

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            for target in self._open_for_writing() - self._baseline:
                if not self.allowed(target) and not target.startswith(("/dev/", "/proc/")):
                    self.writes.append(f"held open for writing {target}")
                    self._baseline.add(target)

    def __enter__(self) -> DiskWatch:
        if not _hooked:  # audit hooks cannot be removed: one for the session, idle when off
            sys.addaudithook(_audit)
            _hooked.append(True)
        self._baseline = self._open_for_writing()
        _watchers.append(self)
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _watchers.remove(self)
        self._stop.set()
        self._sampler.join(timeout=STOP_TIMEOUT)


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("catalog.db")
    }


def test_iterating_writes_nothing_to_disk(
    client: LavenderClient, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = text_dataset(f"s3://{bucket}/zero", shards=8, rows=200)
    feature = lavender.create_shardset(
        dataset.id,
        f"s3://{bucket}/zero-features",
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="double", type_="int64"),
        ],
    )
    Writer.get(dataset_id=dataset.id, shardset_id=feature.id).write(
        [{"uid": u, "double": 2 * u} for u in range(1600)]
    )

    def epoch() -> list[tuple[int, int]]:
        iteration = Iteration.from_dataset(
            dataset.id, batch_size=64, shuffle=True, shuffle_seed=3, format="arrow"
        )
        return [
            (u, d)
            for batch in iteration
            for u, d in zip(batch["uid"].to_pylist(), batch["double"].to_pylist(), strict=True)
        ]

    epoch()  # first use imports modules (Python may write their bytecode caches)
    with DiskWatch(allowed=lambda path: False) as canary:  # the watch does see writes
        (tmp_path / "canary.txt").write_text("seen")
        with pa.OSFile(str(tmp_path / "canary.arrow"), "wb"):
            time.sleep(0.1)
    assert {w.split()[-1] for w in canary.writes} == {
        str(tmp_path / "canary.txt"),
        str(tmp_path / "canary.arrow"),
    }
    empty_tmp = tmp_path / "tmpdir"
    empty_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(empty_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(empty_tmp))
    catalog_files = str(tmp_path / "catalog.db")
    before = files_under(tmp_path)

    with DiskWatch(allowed=lambda path: path.startswith(catalog_files)) as watch:
        rows = epoch()

    assert sorted(rows) == [(u, 2 * u) for u in range(1600)]
    assert watch.writes == []
    assert list(empty_tmp.iterdir()) == []
    assert files_under(tmp_path) == before  # the data home: only the catalog changed


def count_requests(service: LavenderService, url: str) -> Counter[str]:
    """The S3 requests the server's (cached) client of a location sends from now on, by kind."""
    requests: Counter[str] = Counter()
    service.locate(url).fs.s3.meta.events.register(
        "before-send.s3", lambda event_name, **_: requests.update([event_name.split(".")[-1]])
    )
    return requests


def test_each_shard_is_fetched_whole_in_one_get(
    client: LavenderClient, service: LavenderService, bucket: str
) -> None:
    dataset = text_dataset(f"s3://{bucket}/gets", shards=5, rows=100)
    requests = count_requests(service, f"s3://{bucket}/gets")
    assert sorted(uids(Iteration.from_dataset(dataset.id, batch_size=50))) == list(range(500))
    assert requests["GetObject"] == 5
    assert requests["ListObjectsV2"] == 0


# -- storage options and secrets ------------------------------------------------------------


def test_shardset_options_override_server_defaults_and_secrets_stay_hidden(
    catalog: Catalog, moto: MotoServer, bucket: str
) -> None:
    refusing = socket.socket()  # bound, never listening: connections to it are refused
    refusing.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{refusing.getsockname()[1]}"
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    server_secret = f"server-s3cr3t-{uuid.uuid4().hex}"
    settings = ServerSettings(s3_endpoint_url=dead, s3_secret_access_key=server_secret)
    service = LavenderService(catalog, storage_defaults=settings.storage_defaults(), retry=RETRY)
    with refusing, serving(service) as (url, raw):
        lavender.init(url, timeout=CALL_TIMEOUT)
        dataset = lavender.create_dataset("secret")
        shardset = lavender.create_shardset(
            dataset.id,
            f"s3://{bucket}/secret",
            COLUMNS,
            storage_options={
                "client_kwargs": {"endpoint_url": moto.endpoint},
                "key": "AKIASHARDSETKEY",
                "secret": secret,
                "config_kwargs": {"read_timeout": 5},
            },
        )
        write_rows(dataset.id, shardset.id, shards=2, rows=10)
        # the shardset's endpoint wins over the server's dead one: reads work
        assert sorted(uids(Iteration.from_dataset(dataset.id, batch_size=4))) == list(range(20))
        assert shardset.storage_options == {
            "client_kwargs": {"endpoint_url": moto.endpoint},
            "key": "***",
            "secret": "***",
            "config_kwargs": {"read_timeout": 5},
        }
        answers = [
            raw_action(raw, "get_dataset", {"dataset_id": dataset.id}),
            raw_action(raw, "list_datasets", {}),
            raw_action(raw, "get_shardset", {"dataset_id": dataset.id, "shardset_id": shardset.id}),
            raw_action(
                raw, "sync_shardset", {"dataset_id": dataset.id, "shardset_id": shardset.id}
            ),
            raw_action(raw, "list_iterations", {}),
        ]
        leaked = [secret.encode(), server_secret.encode(), b"AKIASHARDSETKEY"]
        assert not [a for a in answers if any(value in a for value in leaked)]
        assert secret not in repr(lavender.get_dataset(dataset_id=dataset.id))
        # the server itself keeps them, to open the location next time
        stored = catalog.get_shardset(dataset.id, shardset.id).storage_options
        assert (stored["key"], stored["secret"]) == ("AKIASHARDSETKEY", secret)
        assert secret not in repr(catalog.get_shardset(dataset.id, shardset.id))


@contextmanager
def serving(service: LavenderService) -> Iterator[tuple[str, flight.FlightClient]]:
    """A Flight server over ``service``: its URL and a plain Flight client."""
    server = LavenderFlightServer(service, "grpc://127.0.0.1:0")
    url = f"grpc://127.0.0.1:{server.port}"
    raw = flight.connect(url)
    try:
        yield url, raw
    finally:
        raw.close()
        if lavender._client is not None:
            lavender._client.close()
            lavender._client = None
        server.shutdown()


def raw_action(raw: flight.FlightClient, name: str, body: dict[str, Any]) -> bytes:
    results = list(raw.do_action(flight.Action(name, json.dumps(body).encode()), call_options()))
    return b"".join(r.body.to_pybytes() for r in results)


# -- failures -------------------------------------------------------------------------------


def test_missing_object_follows_the_failure_policy(
    client: LavenderClient, moto: MotoServer, bucket: str
) -> None:
    dataset = text_dataset(f"s3://{bucket}/holes", shards=4, rows=25)
    uploader(moto.endpoint).rm_file(f"{bucket}/holes/shard.00000002.parquet")

    skipping = Iteration.from_dataset(dataset.id, batch_size=10, skip_on_failure=True)
    assert sorted(uids(skipping)) == [*range(50), *range(75, 100)]
    progress = lavender.get_iteration(skipping.id)
    assert (progress.completed, progress.failed, progress.done) == (75, 25, True)

    strict = Iteration.from_dataset(dataset.id, batch_size=10)
    with pytest.raises(ShardNotFound) as caught:
        uids(strict)
    assert f"shard file s3://{bucket}/holes/shard.00000002.parquet does not exist" in str(
        caught.value
    )


def test_writing_to_a_missing_bucket_says_so(client: LavenderClient) -> None:
    dataset = lavender.create_dataset("nobucket")
    shardset = lavender.create_shardset(dataset.id, "s3://no-such-bucket-here/x", COLUMNS)
    with pytest.raises(
        StorageError,
        match=r"cannot write s3://no-such-bucket-here/x/shard\.0+\."
        r"parquet: its bucket or folder does not exist",
    ):
        Writer.get(dataset_id=dataset.id, shardset_id=shardset.id).write([{"uid": 1, "text": "a"}])
    assert lavender.list_shards(dataset.id, shardset.id) == []


def two_ranks_half_read(
    endpoint: str, service: LavenderService
) -> tuple[Iteration, Iteration, list[int]]:
    """12 shards on the given server; a 2-rank iteration whose rank 0 was read to the end.

    Then the server forgets the shards it decoded (they stay in its memory budget
    otherwise), so rank 1 needs every shard again, and its reads all happen after this
    returns: a fault made then lands mid-iteration, at a point the test chooses, whatever
    the server prefetched before.
    """
    bucket = new_bucket(endpoint)
    options = {"client_kwargs": {"endpoint_url": endpoint}, **FAST_FAILING}
    dataset = text_dataset(f"s3://{bucket}/fault", shards=12, rows=40, **options)
    iteration_id = f"fault-{uuid.uuid4().hex[:8]}"
    rank0, rank1 = (
        Iteration.from_dataset(
            dataset.id,
            batch_size=16,
            shuffle_block_size=1,
            rank=rank,
            world_size=2,
            iteration_id=iteration_id,
        )
        for rank in (0, 1)
    )
    delivered = uids(rank0)
    service.memory.clear()
    return rank0, rank1, delivered


def test_s3_pausing_mid_iteration_is_ridden_out_by_retries(
    client: LavenderClient,
    moto_alone: MotoServer,
    service: LavenderService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rank0, rank1, delivered = two_ranks_half_read(moto_alone.endpoint, service)
    assert len(delivered) == 240

    moto_alone.pause()
    timer = moto_alone.resume_after(2.0)  # longer than a read timeout
    try:
        with caplog.at_level("WARNING", logger="lavender_flight.flight_server.storage"):
            delivered += uids(rank1)
    finally:
        timer.join(timeout=STOP_TIMEOUT)
    assert sorted(delivered) == list(range(480))
    progress = lavender.get_iteration(rank0.id)
    assert (progress.completed, progress.failed, progress.done) == (480, 0, True)
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retried, "the pause should have cost at least one retry"
    assert re.match(
        r"cannot read s3://lf-\w+/fault/shard\.\d+\.parquet: ReadTimeoutError", retried[0]
    )


def test_s3_outage_fails_with_a_clear_error_once_retries_are_spent(
    client: LavenderClient, moto_alone: MotoServer, service: LavenderService
) -> None:
    rank0, rank1, delivered = two_ranks_half_read(moto_alone.endpoint, service)
    assert len(delivered) == 240

    moto_alone.pause()
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        uids(rank1)
    took = time.monotonic() - started
    message = str(caught.value)
    assert re.match(r"cannot read s3://lf-\w+/fault/shard\.\d+\.parquet: ReadTimeoutError", message)
    assert re.search(r"still failing after 4 attempts over \d+\.\ds", message)
    assert took < 30, f"giving up took {took:.1f}s"
    moto_alone.resume()
    progress = lavender.get_iteration(rank0.id)
    assert progress.ranks[1].completed == 0 and not progress.done


# -- what counts as transient ----------------------------------------------------------------


def _client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def _wrapped(cause: Exception, outer: Exception) -> Exception:
    outer.__cause__ = cause
    return outer


def _transient_cases() -> list[tuple[str, Callable[[], BaseException], bool]]:
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    return [
        ("connection refused", lambda: EndpointConnectionError(endpoint_url="http://x"), True),
        ("connection reset", lambda: ConnectionResetError(104, "reset by peer"), True),
        ("connection closed", lambda: ConnectionClosedError(endpoint_url="http://x"), True),
        ("read timeout", lambda: ReadTimeoutError(endpoint_url="http://x"), True),
        ("500", lambda: _client_error(500, "InternalError"), True),
        ("503 slow down", lambda: _client_error(503, "SlowDown"), True),
        ("throttling", lambda: _client_error(400, "ThrottlingException"), True),
        ("429", lambda: _client_error(429, "TooManyRequests"), True),
        (
            "s3fs's OSError over a 503",
            lambda: _wrapped(_client_error(503, "ServiceUnavailable"), OSError(5, "unavailable")),
            True,
        ),
        ("404", lambda: _client_error(404, "NoSuchKey"), False),
        ("403", lambda: _client_error(403, "AccessDenied"), False),
        ("missing file", lambda: FileNotFoundError("bucket/key"), False),
        ("permission", lambda: PermissionError("denied"), False),
        ("no credentials", lambda: NoCredentialsError(), False),
        ("bad option", lambda: TypeError("unexpected keyword argument"), False),
    ]


@pytest.mark.parametrize(
    ("case", "make", "expected"), _transient_cases(), ids=[c[0] for c in _transient_cases()]
)
def test_which_errors_are_retried(
    case: str, make: Callable[[], BaseException], expected: bool
) -> None:
    assert is_transient(make()) is expected, case


# -- upgrading a catalog --------------------------------------------------------------------


def test_a_catalog_from_before_storage_options_opens_with_none(tmp_path: Path) -> None:
    import adbc_driver_sqlite.dbapi as sqlite_dbapi

    from lavender_flight.catalog._schema import MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "old.db"
    with sqlite_dbapi.connect(str(path), autocommit=True) as conn:
        statements = [
            *MIGRATIONS[0],
            *MIGRATIONS[1],
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
            "INSERT INTO meta (key, value) VALUES ('schema_version', '2')",
            "INSERT INTO datasets VALUES ('ds-old', 'old', 'uid', 1.0)",
            "INSERT INTO shardsets VALUES ('ss-old', 'ds-old', 's3://b/old', 1, 0, 1.0)",
            "INSERT INTO shardset_columns VALUES ('ss-old', 0, 'uid', 'int64', '')",
        ]
        for sql in statements:
            with conn.cursor() as cur:
                cur.execute(sql)
    catalog = Catalog(path)
    try:
        assert catalog.schema_version == SCHEMA_VERSION >= 3
        (shardset,) = catalog.get_dataset(name="old").shardsets
        assert (shardset.location, shardset.storage_options) == ("s3://b/old", {})
    finally:
        catalog.close()
