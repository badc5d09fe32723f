"""Bad inputs end to end through a real server: the right error class, a clear message, and
a catalog left exactly as it was (pyarrow's ``test_roundtrip_errors`` style: one table)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.client.writer import Writer
from lavender_flight.protocol import Dataset, Shardset
from lavender_flight.protocol.errors import (
    ActionNotFound,
    AlreadyExists,
    DatasetAlreadyExists,
    DatasetNotFound,
    InvalidArgument,
    InvalidLocation,
    InvalidRequest,
    LavenderError,
    NotFound,
    SchemaMismatch,
    ServerUnavailable,
    ShardAlreadyExists,
    ShardNotFound,
    ShardsetNotFound,
)
from lavender_flight.protocol.wire import MAX_PAYLOAD_BYTES

from ..conftest import call_options

UID_TEXT = [{"name": "uid", "type": "int"}, {"name": "text", "type": "str"}]
TYPE_EXAMPLES = r"examples: int, str, float, bool, bytes, int32"


@dataclass
class World:
    """A server holding a little of everything, and the ways to talk to it."""

    client: LavenderClient
    raw: flight.FlightClient
    data_dir: Path
    base: Dataset  # shardset ``main`` (uid, text) with shard 0 = uids 0..2
    main: Shardset
    late: Shardset  # of ``base``: (uid, score); a bad file landed in its folder after creation
    empty: Dataset  # no shardsets yet
    writer: Writer

    def uri(self, *parts: str) -> str:
        return self.data_dir.joinpath(*parts).as_uri()


@pytest.fixture
def world(client: LavenderClient, raw_flight: flight.FlightClient, data_dir: Path) -> World:
    base = lavender.create_dataset("base")
    main = lavender.create_shardset(base.id, (data_dir / "main").as_uri(), UID_TEXT)
    writer = Writer.get(dataset_id=base.id, shardset_id=main.id)
    writer.write([{"uid": i, "text": f"sample {i}"} for i in range(3)])

    (data_dir / "late").mkdir()
    pq.write_table(
        pa.table({"uid": [10, 11], "score": [0.5, 0.25]}), data_dir / "late" / "a.parquet"
    )
    late = lavender.create_shardset(base.id, (data_dir / "late").as_uri())
    pq.write_table(pa.table({"uid": [12], "score": ["high"]}), data_dir / "late" / "b.parquet")

    # text declared str elsewhere, int64 in this file
    (data_dir / "bad_types").mkdir()
    pq.write_table(
        pa.table({"uid": [1, 2], "text": [7, 8]}), data_dir / "bad_types" / "part-0.parquet"
    )
    # the first file is fine, the second is not: nothing at all may be registered
    (data_dir / "mixed").mkdir()
    pq.write_table(pa.table({"uid": [1], "caption": ["a"]}), data_dir / "mixed" / "a.parquet")
    pq.write_table(pa.table({"uid": [2], "caption": [3]}), data_dir / "mixed" / "b.parquet")

    (data_dir / "no_uid").mkdir()
    pq.write_table(pa.table({"id": [1, 2]}), data_dir / "no_uid" / "part-0.parquet")

    empty = lavender.create_dataset("empty")
    return World(
        client=client,
        raw=raw_flight,
        data_dir=data_dir,
        base=lavender.get_dataset(dataset_id=base.id),
        main=lavender.get_shardset(base.id, main.id),
        late=lavender.get_shardset(base.id, late.id),
        empty=empty,
        writer=writer,
    )


def snapshot(w: World) -> dict[str, Any]:
    """Everything a user could see change: datasets, shardsets, shards, and files on disk."""
    datasets = lavender.list_datasets()
    shards = {
        shardset.id: lavender.list_shards(dataset.id, shardset.id)
        for dataset in datasets
        for shardset in dataset.shardsets
    }
    files = sorted(
        (str(p.relative_to(w.data_dir)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in w.data_dir.rglob("*")
    )
    return {"datasets": datasets, "shards": shards, "files": files}


# -- helpers the table calls --------------------------------------------------------------


def raw_action(w: World, name: str, body: bytes) -> list[bytes]:
    """A ``do_action`` with any bytes as body, as a plain pyarrow user sends it."""
    results = w.raw.do_action(flight.Action(name, body), call_options())
    return [r.body.to_pybytes() for r in results]


def our_action(w: World, name: str, body: bytes) -> list[bytes]:
    """The same bytes through our client's connection and its error translation."""
    with w.client.errors():
        results = w.client.flight.do_action(flight.Action(name, body), w.client.options())
        return [r.body.to_pybytes() for r in results]


def our_do_get(w: World, ticket: bytes) -> pa.Table:
    with w.client.errors():
        return w.client.flight.do_get(flight.Ticket(ticket), w.client.options()).read_all()


def our_do_put(w: World, command: bytes) -> None:
    table = pa.table({"uid": pa.array([99], pa.int64()), "text": ["x"]})
    descriptor = flight.FlightDescriptor.for_command(command)
    with w.client.errors():
        writer, answers = w.client.flight.do_put(descriptor, table.schema, w.client.options())
        try:
            writer.write_table(table)
            writer.done_writing()
            answers.read()
        finally:
            writer.close()


def oversized_body() -> bytes:
    return json.dumps({"name": "x" * MAX_PAYLOAD_BYTES}).encode()


def ticket(**fields: Any) -> bytes:
    return json.dumps({"kind": "shard", **fields}).encode()


# -- the table ----------------------------------------------------------------------------

Call = Callable[[World], object]


def case(
    description: str,
    call: Call,
    expected: type[Exception],
    pattern: str,
    *,
    bug: str | None = None,
) -> Any:
    """One row: ``call`` raises ``expected`` with a message matching ``pattern``."""
    marks = [pytest.mark.xfail(strict=True, reason=f"BUG {bug}")] if bug else []
    return pytest.param(description, call, expected, pattern, marks=marks, id=description)


CASES: list[Any] = [
    # unknown things
    case(
        "unknown dataset by name",
        lambda w: lavender.get_dataset(name="nope"),
        DatasetNotFound,
        r"^no dataset with name 'nope'$",
    ),
    case(
        "unknown dataset by id",
        lambda w: lavender.get_dataset(dataset_id="ds-nope"),
        DatasetNotFound,
        r"^no dataset with id 'ds-nope'$",
    ),
    case(
        "read_dataset of unknown name",
        lambda w: lavender.read_dataset("nope"),
        DatasetNotFound,
        r"no dataset named 'nope'",
    ),
    case(
        "delete_dataset of unknown id",
        lambda w: lavender.delete_dataset("ds-nope"),
        DatasetNotFound,
        r"^no dataset with id 'ds-nope'$",
    ),
    case(
        "create_shardset on unknown dataset (folder not created)",
        lambda w: lavender.create_shardset("ds-nope", w.uri("never"), UID_TEXT),
        DatasetNotFound,
        r"ds-nope",
    ),
    case(
        "unknown shardset",
        lambda w: lavender.get_shardset(w.base.id, "ss-nope"),
        ShardsetNotFound,
        r"no shardset 'ss-nope' in dataset",
    ),
    case(
        "list_shards of unknown shardset",
        lambda w: lavender.list_shards(w.base.id, "ss-nope"),
        ShardsetNotFound,
        r"ss-nope",
    ),
    case(
        "message ending in a double quote arrives whole",
        lambda w: lavender.get_dataset(name="it's"),
        DatasetNotFound,
        r"""^no dataset with name "it's"$""",
    ),
    # names taken
    case(
        "duplicate dataset name",
        lambda w: lavender.create_dataset("base"),
        DatasetAlreadyExists,
        r"^a dataset named 'base' exists already$",
    ),
    case(
        "dataset name with a slash",
        lambda w: lavender.create_dataset("a/b"),
        InvalidArgument,
        r"invalid dataset name 'a/b'.*no '/'",
    ),
    # shardset columns
    case(
        "shardset columns lack the uid column",
        lambda w: lavender.create_shardset(
            w.empty.id, w.uri("no-uid"), [{"name": "text", "type": "str"}]
        ),
        InvalidArgument,
        r"lack the dataset's uid column 'uid'",
    ),
    case(
        "inferred columns lack the uid column",
        lambda w: lavender.create_shardset(w.empty.id, w.uri("no_uid")),
        InvalidArgument,
        r"\['id'\] lack the dataset's uid column 'uid'",
    ),
    case(
        "column name clashes with another shardset",
        lambda w: lavender.create_shardset(w.base.id, w.uri("clash"), UID_TEXT),
        InvalidArgument,
        r"column names clash with other shardsets.*'text'",
    ),
    case(
        "no columns and nothing to infer them from",
        lambda w: lavender.create_shardset(w.empty.id, w.uri("nothing-here")),
        InvalidArgument,
        r"no shard file at .*nothing-here to infer columns from",
    ),
    case(
        "unknown column type (checked client side)",
        lambda w: lavender.create_shardset(
            w.empty.id, w.uri("t"), [{"name": "uid", "type": "nope"}]
        ),
        InvalidArgument,
        rf"^invalid column .*: type: unknown column type 'nope'; {TYPE_EXAMPLES}",
    ),
    case(
        "negative shard index (checked client side)",
        lambda w: Writer.get(dataset_id=w.base.id, shardset_id=w.base.shardsets[0].id).write(
            [{"uid": 1, "text": "x"}], shard_index=-1
        ),
        InvalidArgument,
        r"^invalid write: shard_index: Input should be greater than or equal to 0$",
    ),
    case(
        "preview limit too large (checked client side)",
        lambda w: lavender.preview_dataset(w.base.id, limit=20_000),
        InvalidArgument,
        r"^invalid arguments: limit: Input should be less than or equal to 10000$",
    ),
    case(
        "unknown column type (checked by the server)",
        lambda w: w.client.action(
            "create_shardset",
            {
                "dataset_id": w.empty.id,
                "location": w.uri("t"),
                "columns": [{"name": "uid", "type": "nope"}],
            },
        ),
        InvalidRequest,
        rf"columns\.0\.type: .*unknown column type 'nope'; {TYPE_EXAMPLES}",
    ),
    # shard files that disagree with the declared columns
    case(
        "shard file column type disagrees with declared columns",
        lambda w: lavender.create_shardset(w.empty.id, w.uri("bad_types"), UID_TEXT),
        SchemaMismatch,
        r"bad_types/part-0\.parquet: column 'text' is int64, declared string",
    ),
    case(
        "second shard file disagrees with the first (inferred columns)",
        lambda w: lavender.create_shardset(w.empty.id, w.uri("mixed")),
        SchemaMismatch,
        r"mixed/b\.parquet: column 'caption' is int64, declared string",
    ),
    case(
        "sync finds a file that disagrees",
        lambda w: lavender.sync_shardset(w.base.id, w.late.id),
        SchemaMismatch,
        r"late/b\.parquet: column 'score' is string, declared double",
    ),
    # Writer
    case(
        "Writer: value does not fit the declared type",
        lambda w: w.writer.write([{"uid": "not a number", "text": "a"}], shard_index=5),
        SchemaMismatch,
        r"samples do not fit the declared columns: .*'not a number'.*int64",
    ),
    case(
        "Writer: int too large for the column",
        lambda w: w.writer.write([{"uid": 2**70, "text": "a"}], shard_index=5),
        SchemaMismatch,
        r"samples do not fit the declared columns",
    ),
    case(
        "Writer: undeclared column",
        lambda w: w.writer.write([{"uid": 1, "text": "a", "extra": 1}], shard_index=5),
        SchemaMismatch,
        r"column\(s\) 'extra' that shardset .* does not declare",
    ),
    case(
        "Writer: Arrow table of the wrong type (checked by the server)",
        lambda w: w.writer.write(pa.table({"uid": [5], "text": [5]}), shard_index=5),
        SchemaMismatch,
        r"shard 5: column 'text' is int64, declared string",
    ),
    case(
        "Writer: null uid",
        lambda w: w.writer.write([{"uid": None, "text": "a"}], shard_index=5),
        SchemaMismatch,
        r"uid column 'uid' holds 1 null value",
    ),
    case(
        "Writer: unknown format",
        lambda w: Writer(w.client, w.main, "xml").write([{"uid": 5, "text": "a"}], shard_index=5),
        InvalidArgument,
        r"unknown shard format 'xml'; known: parquet, arrow, csv, jsonl",
    ),
    case(
        "Writer: shard index taken, no overwrite",
        lambda w: w.writer.write([{"uid": 7, "text": "new"}], shard_index=0),
        ShardAlreadyExists,
        r"shard 0 of shardset ss-\w+ exists .*shard\.00000000\.parquet.*overwrite=True",
    ),
    # locations
    case(
        "location with an unknown protocol",
        lambda w: lavender.create_shardset(w.empty.id, "nope://x", UID_TEXT),
        InvalidLocation,
        r"unknown protocol 'nope' in location 'nope://x'",
    ),
    case(
        "location names a file",
        lambda w: lavender.create_shardset(
            w.empty.id, w.uri("main", "shard.00000000.parquet"), UID_TEXT
        ),
        InvalidLocation,
        r"shard\.00000000\.parquet' names a file; a shardset location is the folder",
    ),
    # garbage on the wire, through our client
    case(
        "action body is not JSON",
        lambda w: our_action(w, "create_dataset", b"\xff\x00{not json"),
        InvalidRequest,
        r"^invalid create_dataset body: body: Invalid JSON",
    ),
    case(
        "action body of wrong types",
        lambda w: w.client.action("create_dataset", {"name": 5}),
        InvalidRequest,
        r"^invalid create_dataset body: name: Input should be a valid string",
    ),
    case(
        "action body is a JSON array",
        lambda w: our_action(w, "create_dataset", b"[1, 2]"),
        InvalidRequest,
        r"body: Input should be an object",
    ),
    case(
        "action body with unknown fields",
        lambda w: w.client.action("create_dataset", {"name": "x", "colour": "red"}),
        InvalidRequest,
        r"colour: Extra inputs are not permitted",
    ),
    case(
        "action body of a future version",
        lambda w: w.client.action("create_dataset", {"name": "x", "v": 2}),
        InvalidRequest,
        r"v: Input should be 1",
    ),
    case(
        "action body over 1 MiB",
        lambda w: our_action(w, "create_dataset", oversized_body()),
        InvalidRequest,
        rf"create_dataset body is \d+ bytes; the limit is {MAX_PAYLOAD_BYTES}",
    ),
    case(
        "preview limit over the maximum",
        lambda w: w.client.action("preview_dataset", {"dataset_id": w.base.id, "limit": 10**6}),
        InvalidRequest,
        r"limit: Input should be less than or equal to 10000",
    ),
    case(
        "unknown action",
        lambda w: w.client.action("drop_everything"),
        ActionNotFound,
        r"^no action 'drop_everything'; actions: ack, check_iteration, create_dataset, "
        r"create_shardset",
    ),
    case(
        "garbage do_get ticket",
        lambda w: our_do_get(w, b"\x00garbage"),
        InvalidRequest,
        r"^invalid ticket: ",
    ),
    case(
        "forged ticket of the wrong kind",
        lambda w: our_do_get(w, ticket(kind="iteration", dataset_id=w.base.id, shard_index=0)),
        InvalidRequest,
        # every field named, in whatever order pydantic lists them
        r"^invalid ticket: (?=.*iteration\.dataset_id: Extra inputs are not permitted)"
        r"(?=.*iteration\.shard_index: Extra inputs are not permitted)"
        r"(?=.*iteration\.iteration_id: Field required)",
    ),
    case(
        "forged ticket for an unknown dataset",
        lambda w: our_do_get(w, ticket(dataset_id="ds-nope", shard_index=0)),
        DatasetNotFound,
        r"ds-nope",
    ),
    case(
        "forged ticket for an unknown shard",
        lambda w: our_do_get(w, ticket(dataset_id=w.base.id, shard_index=99)),
        ShardNotFound,
        r"no shard 99",
    ),
    case(
        "garbage do_put command",
        lambda w: our_do_put(w, b"\x00garbage"),
        InvalidRequest,
        r"^invalid put command: ",
    ),
]


@pytest.mark.parametrize(("description", "call", "expected", "pattern"), CASES)
def test_bad_input_raises_and_changes_nothing(
    world: World, description: str, call: Call, expected: type[Exception], pattern: str
) -> None:
    before = snapshot(world)
    with pytest.raises(expected) as info:
        call(world)
    exc = info.value
    message = str(exc)
    assert re.search(pattern, message, re.DOTALL), f"{description}: {message!r} !~ {pattern!r}"
    if isinstance(exc, LavenderError):
        assert type(exc) is expected, f"{description}: got {type(exc).__name__}"
        assert message == exc.message
        assert "Traceback" not in message
        assert "Detail:" not in message
        assert "gRPC" not in message
        assert exc.__cause__ is None
    if issubclass(expected, NotFound):
        assert isinstance(exc, KeyError)
        assert not message.startswith("'"), "KeyError quoting leaked into the message"
    if issubclass(expected, (InvalidArgument, AlreadyExists)):
        assert isinstance(exc, ValueError)
    assert snapshot(world) == before, f"{description}: the catalog or the files changed"


# -- the same garbage from a plain pyarrow client -----------------------------------------

RAW_CASES: list[Any] = [
    case(
        "non-JSON action body",
        lambda w: raw_action(w, "create_dataset", b"\xff\x00{not json"),
        pa.ArrowInvalid,
        r"^InvalidRequest: invalid create_dataset body: body: Invalid JSON",
    ),
    case(
        "action body of wrong types",
        lambda w: raw_action(w, "create_dataset", b'{"name": 5}'),
        pa.ArrowInvalid,
        r"^InvalidRequest: invalid create_dataset body: name: ",
    ),
    case(
        "action body with unknown fields",
        lambda w: raw_action(w, "create_dataset", b'{"name": "x", "colour": "red"}'),
        pa.ArrowInvalid,
        r"^InvalidRequest: .*colour: Extra inputs are not permitted",
    ),
    case(
        "empty action body where fields are required",
        lambda w: raw_action(w, "create_dataset", b""),
        pa.ArrowInvalid,
        r"^InvalidRequest: invalid create_dataset body: name: Field required",
    ),
    case(
        "action body over 1 MiB",
        lambda w: raw_action(w, "create_dataset", oversized_body()),
        pa.ArrowInvalid,
        rf"^InvalidRequest: create_dataset body is \d+ bytes; the limit is {MAX_PAYLOAD_BYTES}",
    ),
    case(
        "unknown action",
        lambda w: raw_action(w, "drop_everything", b"{}"),
        KeyError,
        r"^ActionNotFound: no action 'drop_everything'",
    ),
    case(
        "unknown dataset",
        lambda w: raw_action(w, "get_dataset", b'{"name": "nope"}'),
        KeyError,
        r"^DatasetNotFound: no dataset with name 'nope'",
    ),
    case(
        "duplicate dataset (ALREADY_EXISTS travels as INVALID_ARGUMENT)",
        lambda w: raw_action(w, "create_dataset", b'{"name": "base"}'),
        pa.ArrowInvalid,
        r"^DatasetAlreadyExists: a dataset named 'base' exists already",
    ),
    case(
        "garbage do_get ticket",
        lambda w: w.raw.do_get(flight.Ticket(b"\x00garbage"), call_options()).read_all(),
        pa.ArrowInvalid,
        r"^InvalidRequest: invalid ticket: ",
    ),
    case(
        "get_flight_info with a command descriptor",
        lambda w: w.raw.get_flight_info(flight.FlightDescriptor.for_command(b"x"), call_options()),
        pa.ArrowInvalid,
        r"^InvalidRequest: invalid command: ",
    ),
    case(
        "get_flight_info of an unknown dataset",
        lambda w: w.raw.get_flight_info(flight.FlightDescriptor.for_path("nope"), call_options()),
        KeyError,
        r"^DatasetNotFound: no dataset named 'nope'",
    ),
]


@pytest.mark.parametrize(("description", "call", "expected", "pattern"), RAW_CASES)
def test_plain_flight_client_sees_status_and_class_name(
    world: World, description: str, call: Call, expected: type[Exception], pattern: str
) -> None:
    before = snapshot(world)
    with pytest.raises(expected) as info:
        call(world)
    assert isinstance(info.value, pa.ArrowException)
    assert re.search(pattern, str(info.value)), f"{description}: {str(info.value)[:300]!r}"
    assert snapshot(world) == before


# -- errors are the matching builtins -----------------------------------------------------


def test_domain_errors_are_caught_as_builtins(world: World) -> None:
    with pytest.raises(KeyError):
        lavender.get_dataset(name="nope")
    with pytest.raises(ValueError):
        lavender.create_shardset(world.empty.id, world.uri("x"), [{"name": "t", "type": "str"}])
    with pytest.raises(ValueError):
        lavender.create_dataset("base")
    with pytest.raises(ValueError):
        lavender.create_shardset(world.empty.id, "nope://x", UID_TEXT)
    with pytest.raises(LookupError):
        world.client.action("drop_everything")
    assert issubclass(DatasetNotFound, KeyError)
    assert issubclass(InvalidArgument, ValueError)
    assert issubclass(InvalidRequest, ValueError)
    assert issubclass(ServerUnavailable, ConnectionError)


def test_error_text_is_one_clean_line(world: World) -> None:
    with pytest.raises(DatasetNotFound) as info:
        lavender.get_dataset(name="nope")
    assert str(info.value) == "no dataset with name 'nope'"
    assert repr(info.value).startswith("DatasetNotFound(")
    with pytest.raises(InvalidRequest) as garbage:
        our_action(world, "create_dataset", b"\xff")
    assert "\n" not in str(garbage.value)
    assert "Traceback" not in str(garbage.value)
    assert "Detail:" not in str(garbage.value)


# -- the good paths next to the bad ones --------------------------------------------------


def test_shard_overwrite_replaces_it(world: World) -> None:
    with pytest.raises(ShardAlreadyExists):
        world.writer.write([{"uid": 50, "text": "replacement"}], shard_index=0)
    shard = world.writer.write([{"uid": 50, "text": "replacement"}], shard_index=0, overwrite=True)
    assert (shard.index, shard.num_rows, shard.uid_min, shard.uid_max) == (0, 1, 50, 50)
    shards = lavender.list_shards(world.base.id, world.main.id)
    assert [(s.index, s.num_rows) for s in shards] == [(0, 1)]
    rows = lavender.preview_dataset(world.base.id, columns=["uid", "text"]).to_pylist()
    assert rows == [{"uid": 50, "text": "replacement"}]


def test_location_that_does_not_exist_yet_is_fine(world: World) -> None:
    folder = world.data_dir / "not" / "yet" / "there"
    shardset = lavender.create_shardset(world.empty.id, folder.as_uri(), UID_TEXT)
    assert shardset.location == folder.as_uri()
    assert (shardset.shard_count, shardset.total_samples) == (0, 0)
    writer = Writer.get(dataset_id=world.empty.id, shardset_id=shardset.id)
    writer.write([{"uid": 1, "text": "one"}, {"uid": 2, "text": "two"}])
    assert [p.name for p in folder.iterdir()] == ["shard.00000000.parquet"]
    assert lavender.get_dataset(name="empty").total_samples == 2
    rows = lavender.preview_dataset(world.empty.id).to_pylist()
    assert rows == [{"uid": 1, "text": "one"}, {"uid": 2, "text": "two"}]


# -- no server ----------------------------------------------------------------------------


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A URL on a port nobody listens on (bound once, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"grpc://127.0.0.1:{port}"
    if lavender._client is not None:
        lavender._client.close()
    lavender._client = None


def test_unreachable_server_raises_server_unavailable(dead_url: str) -> None:
    timeout = 3.0
    lavender.init(dead_url, timeout=timeout)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable) as info:
        lavender.list_datasets()
    elapsed = time.monotonic() - started
    assert elapsed < timeout + 2, f"took {elapsed:.1f}s with a {timeout}s timeout"
    message = str(info.value)
    assert dead_url in message
    assert "cannot reach the Lavender Flight server" in message
    assert "lavender-flight serve" in message
    assert isinstance(info.value, ConnectionError)
    with pytest.raises(ServerUnavailable):
        lavender.get_dataset(name="anything")
