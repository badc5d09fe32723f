"""Shards written through ``do_put``: every check before the body is read, and a size cap.

A real server counts the batches its ``do_put`` reads from each upload (a tiny subclass), so
"refused before the body is read" is a count of zero, not a guess.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import Writer
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.protocol import ColumnOptions, wire
from lavender_flight.protocol.errors import InvalidArgument
from tests.conftest import CALL_TIMEOUT, call_options

COLUMNS = [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="v", type_="int64")]
ROWS_PER_BATCH = 32_768  # two int64 columns: 512 KiB a batch
CAP = 1 << 20


class BatchCountingReader:
    """A ``do_put`` reader that counts the batches read from it."""

    def __init__(self, reader: flight.MetadataRecordBatchReader) -> None:
        self.reader = reader
        self.batches = 0

    @property
    def schema(self) -> pa.Schema:
        return self.reader.schema

    def read_chunk(self) -> flight.FlightStreamChunk:
        chunk = self.reader.read_chunk()  # StopIteration at the end (not a batch)
        self.batches += 1
        return chunk


class BatchCountingServer(LavenderFlightServer):
    """Records how many batches each ``do_put`` read before it answered."""

    def __init__(self, service: LavenderService) -> None:
        super().__init__(service, "grpc://127.0.0.1:0")
        self.consumed: list[int] = []

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        counting = BatchCountingReader(reader)
        try:
            super().do_put(context, descriptor, counting, writer)  # type: ignore[arg-type]
        finally:
            self.consumed.append(counting.batches)


@pytest.fixture
def capped(catalog: Catalog) -> LavenderService:
    """A service whose shards may not pass 1 MiB."""
    return LavenderService(catalog, max_shard_bytes=CAP)


@pytest.fixture
def server(capped: LavenderService) -> Iterator[BatchCountingServer]:
    """The counting server over the capped service (overrides conftest's)."""
    srv = BatchCountingServer(capped)
    yield srv
    srv.shutdown()


def batches(count: int, start: int = 0) -> list[pa.RecordBatch]:
    """``count`` batches of 512 KiB each, uids from ``start``."""
    out = []
    for number in range(count):
        uids = np.arange(ROWS_PER_BATCH, dtype=np.int64) + start + number * ROWS_PER_BATCH
        out.append(pa.record_batch({"uid": uids, "v": uids * 2}))
    return out


def shaped(body: list[pa.RecordBatch], schema: pa.Schema) -> list[pa.RecordBatch]:
    """The batches of ``body`` with the columns of ``schema`` (strings of the numbers...)."""
    out = []
    for batch in body:
        uids = batch.column("uid")
        columns = [uids if f.type == pa.int64() else uids.cast(f.type) for f in schema]
        out.append(pa.RecordBatch.from_arrays(columns, schema=schema))
    return out


def upload(
    api_url: str, command: dict[str, Any], sent: list[pa.RecordBatch], schema: pa.Schema
) -> str:
    """Send ``sent`` with a plain Flight client; the error text the server answered."""
    descriptor = flight.FlightDescriptor.for_command(wire.encode(wire.PutShardCommand(**command)))
    conn = flight.connect(api_url)
    try:
        writer, answers = conn.do_put(descriptor, schema, call_options())
        try:
            for batch in sent:
                writer.write_batch(batch)
            writer.done_writing()
            answers.read()
        except (flight.FlightError, pa.ArrowException):
            pass  # the server's answer comes from close()
        try:
            writer.close()
        except (flight.FlightError, pa.ArrowException) as exc:
            return str(exc).split(". Detail:")[0]
        return ""
    finally:
        conn.close()


@pytest.fixture
def target(client: Any, data_dir: Path) -> dict[str, Any]:
    """A dataset with one shardset (uid, v) whose shard 0 is written."""
    dataset = lavender.create_dataset("uploads")
    shardset = lavender.create_shardset(dataset.id, (data_dir / "s").as_uri(), COLUMNS)
    Writer.get(dataset_id=dataset.id, shardset_id=shardset.id).write(
        pa.Table.from_batches(batches(1)), shard_index=0
    )
    return {"dataset_id": dataset.id, "shardset_id": shardset.id}


def test_uploads_to_a_wrong_target_are_refused_before_the_body_is_read(
    server: BatchCountingServer, api_url: str, target: dict[str, Any]
) -> None:
    schema = batches(1)[0].schema
    body = batches(40)  # 20 MiB and more the server never reads
    cases = {
        "no such dataset": (
            {**target, "dataset_id": "ds-nope", "shard_index": 1},
            schema,
            "DatasetNotFound: no dataset with id 'ds-nope'",
        ),
        "no such shardset": (
            {**target, "shardset_id": "ss-nope", "shard_index": 1},
            schema,
            "ShardsetNotFound: ",
        ),
        "index taken": (
            {**target, "shard_index": 0},
            schema,
            "ShardAlreadyExists: shard 0 of shardset ",
        ),
        "undeclared column": (
            {**target, "shard_index": 1},
            schema.append(pa.field("extra", pa.int64())),
            "SchemaMismatch: columns 'extra' are not declared in shardset ",
        ),
        "wrong type": (
            {**target, "shard_index": 1},
            pa.schema([("uid", pa.int64()), ("v", pa.string())]),
            "SchemaMismatch: shard file://",
        ),
        "unknown format": (
            {**target, "shard_index": 1, "format": "xml"},
            schema,
            "InvalidArgument: unknown shard format 'xml'",
        ),
    }
    for name, (command, sent_schema, expected) in cases.items():
        server.consumed.clear()
        text = upload(api_url, command, shaped(body, sent_schema), sent_schema)
        assert expected in text, f"{name}: {text}"
        assert server.consumed == [0], f"{name}: the server read {server.consumed} batches"
    assert [s.index for s in lavender.list_shards(target["dataset_id"], target["shardset_id"])] == [
        0
    ]


def test_an_upload_over_the_cap_is_refused_as_it_arrives(
    server: BatchCountingServer, api_url: str, target: dict[str, Any]
) -> None:
    schema = batches(1)[0].schema
    server.consumed.clear()
    text = upload(api_url, {**target, "shard_index": 1}, batches(8), schema)
    assert text.startswith(
        f"InvalidArgument: shard 1 of shardset {target['shardset_id']} is over the server's "
        "limit of 1 MiB per shard (1.5 MiB so far; --max-shard-mb): write its rows as "
        "several shards"
    ), text
    assert server.consumed == [3]  # 512 KiB, 1 MiB, then over: the other five never read
    # two batches fit, through our client too, and land as one shard
    server.consumed.clear()
    shard = Writer.get(**target).write(pa.Table.from_batches(batches(2, 10**6)), shard_index=1)
    assert (shard.num_rows, server.consumed) == (2 * ROWS_PER_BATCH, [2])
    with pytest.raises(InvalidArgument, match=r"over the server's limit of 1 MiB per shard"):
        Writer.get(**target).write(pa.Table.from_batches(batches(3, 10**7)), shard_index=2)
    assert [s.index for s in lavender.list_shards(**target)] == [0, 1]


def test_the_cap_holds_for_tables_written_in_process(
    capped: LavenderService, target: dict[str, Any]
) -> None:
    with pytest.raises(InvalidArgument, match=r"2\.0 MiB so far; --max-shard-mb"):
        capped.write_shard(
            target["dataset_id"], target["shardset_id"], 5, pa.Table.from_batches(batches(4))
        )
    assert capped.max_shard_bytes == CAP
    assert CALL_TIMEOUT > 0
