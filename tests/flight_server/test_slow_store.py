"""A store that stops answering holds only its own reads (issue 15.3): one S3 server frozen
with SIGSTOP while two iterations wait on it; an iteration over local data on the same
server keeps its first-batch time and reads to its end, and the frozen reads fail after
``--read-timeout`` with one line naming the store."""

from __future__ import annotations

import re
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.read_pool import ReadPool
from lavender_flight.flight_server.settings import ServerSettings
from lavender_flight.protocol.errors import StorageError
from tests.conftest import CALL_TIMEOUT
from tests.flight_server.test_s3 import (  # noqa: F401  (fixtures)
    COLUMNS,
    RETRY,
    STOP_TIMEOUT,
    MotoServer,
    aws_env,
    moto_alone,
    new_bucket,
)

pytestmark = [pytest.mark.s3, pytest.mark.slow]

READ_TIMEOUT = 6.0
# the frozen store's reads just hang (no botocore timeout first): only --read-timeout ends them
HANGING = {"config_kwargs": {"connect_timeout": 60, "read_timeout": 60}}


@pytest.fixture
def service(catalog: Catalog, moto_alone: MotoServer) -> LavenderService:  # noqa: F811
    """The service as ``serve --s3-endpoint-url <moto> --read-timeout 6`` builds it."""
    settings = ServerSettings(s3_endpoint_url=moto_alone.endpoint)
    return LavenderService(
        catalog,
        storage_defaults=settings.storage_defaults(),
        retry=RETRY,
        read_pool=ReadPool(timeout=READ_TIMEOUT),
    )


@pytest.fixture
def served(service: LavenderService, reset_client: None) -> Iterator[LavenderService]:
    server = LavenderFlightServer(service, "grpc://127.0.0.1:0")
    lavender.init(f"grpc://127.0.0.1:{server.port}", timeout=CALL_TIMEOUT)
    yield service
    server.shutdown()


def write_dataset(location: str, shards: int, rows: int, **options: object) -> str:
    dataset = lavender.create_dataset(f"ds-{uuid.uuid4().hex[:8]}", uid_column_name="uid")
    shardset = lavender.create_shardset(
        dataset.id, location, COLUMNS, storage_options=dict(options) or None
    )
    writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset.id)
    for index in range(shards):
        first = index * rows
        writer.write(
            [{"uid": u, "text": f"sample {u:06d} " + "x" * 90} for u in range(first, first + rows)],
            shard_index=index,
        )
    return dataset.id


def local_epoch(service: LavenderService, dataset_id: str) -> tuple[float, list[int]]:
    """A new shuffled iteration over the local data, decoded afresh: first batch time, uids."""
    service.memory.clear()  # every measure decodes its shards: the same work each time
    iteration = Iteration.from_dataset(dataset_id, batch_size=256, shuffle=True)
    started = time.monotonic()
    stream = iter(iteration)
    first = next(stream)
    took = time.monotonic() - started
    seen = list(first["uid"]) + [u for batch in stream for u in batch["uid"]]
    return took, seen


def test_a_frozen_store_stalls_only_its_own_reads(
    served: LavenderService,
    moto_alone: MotoServer,  # noqa: F811
    data_dir: Path,
) -> None:
    service = served
    local = write_dataset(data_dir.as_uri(), shards=4, rows=2_000)
    bucket = new_bucket(moto_alone.endpoint)
    remote = write_dataset(f"s3://{bucket}/slow", shards=8, rows=500, **HANGING)
    waiting = [Iteration.from_dataset(remote, batch_size=64, shuffle=True) for _ in range(2)]
    for iteration in waiting:
        assert iteration.id  # created (and checked) while the store still answers
    normal = [local_epoch(service, local) for _ in range(3)]
    assert all(sorted(seen) == list(range(8_000)) for _, seen in normal)
    normal_first = statistics.median(took for took, _ in normal)

    service.memory.clear()  # the remote shards must be read again: from the frozen store
    moto_alone.pause()
    outcomes: dict[int, BaseException | None] = {}
    ended: dict[int, float] = {}
    started = time.monotonic()

    def read(index: int) -> None:
        try:
            list(waiting[index])
            outcomes[index] = None
        except BaseException as exc:  # the error the training loop would see
            outcomes[index] = exc
        ended[index] = time.monotonic() - started

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # both streams are waiting on the frozen store now
        stalled = [local_epoch(service, local) for _ in range(3)]
        during = time.monotonic() - started
        for thread in threads:
            thread.join(timeout=READ_TIMEOUT + 30)
    finally:
        moto_alone.resume()
    assert during < READ_TIMEOUT, "the local epochs ran after the frozen reads gave up"
    for _, seen in stalled:
        assert sorted(seen) == list(range(8_000))  # the local iteration flowed to its end
    stalled_first = statistics.median(took for took, _ in stalled)
    assert stalled_first <= 2 * normal_first + 0.25, (
        f"a frozen store moved another dataset's first batch from {normal_first:.3f} s "
        f"to {stalled_first:.3f} s"
    )
    assert set(outcomes) == {0, 1}, "a read over the frozen store never ended"
    for index, error in outcomes.items():
        assert isinstance(error, StorageError), error
        message = str(error)
        assert "\n" not in message
        assert re.search(
            rf"reading block \d+ of iteration \S+ \(s3://{bucket}/slow\) did not answer "
            rf"within {READ_TIMEOUT:g} s \(--read-timeout\); the store may be down",
            message,
        ), message
        assert READ_TIMEOUT - 0.5 <= ended[index] <= READ_TIMEOUT + STOP_TIMEOUT, ended
