"""What a plain Flight client receives for a bad request: the gRPC status of the error's class
and one line of ours, ``ClassName: message``; never a Python traceback, a server file path or
a source line, whatever the status (the table runs for Node.js too, in
``tests/any_language/test_node_errors.py``)."""

from __future__ import annotations

import base64
import json
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

import lavender_flight.protocol
from lavender_flight.catalog import Catalog
from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.auth import ApiKeyMiddlewareFactory
from lavender_flight.flight_server.errors import translate_errors
from lavender_flight.protocol import iterations, wire
from lavender_flight.protocol.errors import (
    ActionNotFound,
    DatasetAlreadyExists,
    DatasetNotFound,
    InvalidLocation,
    InvalidRequest,
    IterationNotFound,
    LavenderError,
    ServerError,
    ShardNotFound,
    StorageError,
    TransformFailed,
    Unauthenticated,
    from_flight_error,
)
from lavender_flight.transforms import Plugins

from ..conftest import CALL_TIMEOUT

KEY = "wire-test-key"
# A bug's own message names a server path: it must stay in the server log.
BUG_MESSAGE = "division by zero in /srv/lavender/secret_module.py"
REPO = Path(lavender_flight.protocol.__file__).resolve().parents[1]
PICKY = '''
from lavender_flight.transforms import Preprocessor


class Picky(Preprocessor, name="picky"):
    """Fails on uid 0."""

    def process(self, batch):
        if 0 in batch.column("uid").to_pylist():
            raise ValueError("uid 0 is not welcome")
        return batch
'''
# What must never reach a client: a traceback, a frame line, our source tree, installed
# packages, the standard library.
LEAKS = [
    re.compile(re.escape(text))
    for text in (
        "Traceback",
        '.py"',
        str(REPO),
        "site-packages",
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["purelib"],
    )
] + [re.compile(r'File "[^"]*", line \d+'), re.compile(r"\n")]


def leaks(text: str) -> list[str]:
    """The forbidden things ``text`` shows (none, if it is clean)."""
    return [pattern.pattern for pattern in LEAKS if pattern.search(text)]


class ServerWithABug(LavenderFlightServer):
    """A server whose ``crash`` action hits a bug (a ZeroDivisionError naming a server path)."""

    @translate_errors
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Any:
        if action.type == "crash":
            raise ZeroDivisionError(BUG_MESSAGE)
        return super().do_action(context, action)


@dataclass
class WireWorld:
    """A keyed server with a bug, a failing plugin and a shard turned into a folder."""

    url: str
    dataset_id: str
    shardset_id: str
    broken_shard: bytes  # a ticket of a shard whose file became a folder
    failing_iteration: bytes  # a ticket of an iteration whose preprocessor fails on uid 0
    vanishing_iteration: bytes  # a ticket of an iteration whose second shard file is gone


@pytest.fixture
def wire_world(tmp_path: Path, reset_client: None) -> Iterator[WireWorld]:
    data = tmp_path / "data"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "picky.py").write_text(PICKY)
    catalog = Catalog(tmp_path / "catalog.db")
    server = ServerWithABug(
        LavenderService(catalog, storage_roots=[tmp_path]),
        "grpc://127.0.0.1:0",
        Plugins.load(modules, entry_points=False),
        middleware={"auth": ApiKeyMiddlewareFactory([KEY])},
    )
    url = f"grpc://127.0.0.1:{server.port}"
    try:
        lavender.init(url, api_key=KEY, timeout=CALL_TIMEOUT)
        dataset = lavender.create_dataset("base")
        shardset = lavender.create_shardset(
            dataset.id, (data / "main").as_uri(), [{"name": "uid", "type": "int"}]
        )
        writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset.id)
        for index in range(2):
            writer.write([{"uid": index * 3 + i} for i in range(3)], shard_index=index)
        failing = Iteration.from_dataset(dataset.id, batch_size=2, preprocessors=["picky"])
        (data / "main" / "shard.00000001.parquet").unlink()
        (data / "main" / "shard.00000001.parquet").mkdir()
        gone = lavender.create_dataset("gone")
        gone_main = lavender.create_shardset(
            gone.id, (data / "gone").as_uri(), [{"name": "uid", "type": "int"}]
        )
        writer = Writer.get(dataset_id=gone.id, shardset_id=gone_main.id)
        for index in range(2):
            writer.write([{"uid": index * 3 + i} for i in range(3)], shard_index=index)
        vanishing = Iteration.from_dataset(gone.id, batch_size=3)
        (data / "gone" / "shard.00000001.parquet").unlink()
        yield WireWorld(
            url=url,
            dataset_id=dataset.id,
            shardset_id=shardset.id,
            broken_shard=wire.encode(wire.ShardTicket(dataset_id=dataset.id, shard_index=1)),
            failing_iteration=wire.encode(
                iterations.IterationTicket(iteration_id=failing.id, rank=0)
            ),
            vanishing_iteration=wire.encode(
                iterations.IterationTicket(iteration_id=vanishing.id, rank=0)
            ),
        )
    finally:
        server.shutdown()
        catalog.close()


# -- the calls, as data both clients can make ---------------------------------------------


@dataclass(frozen=True)
class RawCall:
    """One raw Flight call: ``rpc`` and its bytes; ``token`` is the API key sent, if any."""

    rpc: str  # DoAction, DoGet, GetFlightInfo, DoPut
    action: str = ""
    body: bytes = b""  # action body, ticket, or descriptor command
    path: tuple[str, ...] = ()  # a path descriptor instead of a command
    token: str | None = KEY

    def descriptor(self) -> flight.FlightDescriptor:
        if self.path:
            return flight.FlightDescriptor.for_path(*self.path)
        return flight.FlightDescriptor.for_command(self.body)

    def as_json(self) -> dict[str, Any]:
        """The call as ``tests/any_language/node/call_raw.mjs`` reads it."""
        b64 = base64.b64encode(self.body).decode()
        descriptor = {"type": "PATH", "path": list(self.path)} if self.path else {
            "type": "CMD", "cmd": b64
        }  # fmt: skip
        out: dict[str, Any] = {"rpc": self.rpc, "token": self.token}
        if self.rpc == "DoAction":
            out.update(type=self.action, body=b64)
        elif self.rpc == "DoGet":
            out.update(ticket=b64)
        elif self.rpc == "GetFlightInfo":
            out.update(descriptor=descriptor)
        else:
            schema = PUT_TABLE.schema.serialize().to_pybytes()
            header = schema[8 : 8 + int.from_bytes(schema[4:8], "little")]
            out.update(descriptor=descriptor, data_header=base64.b64encode(header).decode())
        return out

    def run(self, raw: flight.FlightClient) -> None:
        """Make the call with pyarrow."""
        headers = [(b"authorization", f"Bearer {self.token}".encode())] if self.token else []
        options = flight.FlightCallOptions(timeout=CALL_TIMEOUT, headers=headers)
        if self.rpc == "DoAction":
            list(raw.do_action(flight.Action(self.action, self.body), options))
        elif self.rpc == "DoGet":
            raw.do_get(flight.Ticket(self.body), options).read_all()
        elif self.rpc == "GetFlightInfo":
            raw.get_flight_info(self.descriptor(), options)
        else:
            writer, answers = raw.do_put(self.descriptor(), PUT_TABLE.schema, options)
            try:
                writer.write_table(PUT_TABLE)
                writer.done_writing()
                answers.read()
            finally:
                writer.close()


PUT_TABLE = pa.table({"uid": pa.array([99], pa.int64())})


@dataclass(frozen=True)
class Case:
    """A bad call, the status any Flight client must get, and the class ours rebuilds."""

    description: str
    call: Callable[[WireWorld], RawCall]
    status: str  # the gRPC status name
    cls: type[LavenderError]
    pattern: str  # the message after "ClassName: "
    marks: list[Any] = field(default_factory=list)


def action(name: str, body: bytes | dict[str, Any], token: str | None = KEY) -> RawCall:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RawCall("DoAction", action=name, body=payload, token=token)


CASES = [
    # INVALID_ARGUMENT
    Case(
        "action body is not JSON",
        lambda w: action("create_dataset", b"\xff\x00{not json"),
        "INVALID_ARGUMENT",
        InvalidRequest,
        r"^invalid create_dataset body: body: Invalid JSON",
    ),
    Case(
        "action body of wrong types",
        lambda w: action("create_dataset", {"name": 5}),
        "INVALID_ARGUMENT",
        InvalidRequest,
        r"^invalid create_dataset body: name: Input should be a valid string",
    ),
    Case(
        "action body over 1 MiB",
        lambda w: action("create_dataset", {"name": "x" * wire.MAX_PAYLOAD_BYTES}),
        "INVALID_ARGUMENT",
        InvalidRequest,
        r"^create_dataset body is \d+ bytes; the limit is",
    ),
    Case(
        "a location of an unknown protocol",
        lambda w: action(
            "create_shardset",
            {"dataset_id": w.dataset_id, "location": "nope://x", "columns": []},
        ),
        "INVALID_ARGUMENT",
        InvalidLocation,
        r"unknown protocol 'nope'",
    ),
    Case(
        "a taken dataset name (ALREADY_EXISTS cannot be sent from Python)",
        lambda w: action("create_dataset", {"name": "base"}),
        "INVALID_ARGUMENT",
        DatasetAlreadyExists,
        r"^a dataset named 'base' exists already$",
    ),
    Case(
        "garbage ticket",
        lambda w: RawCall("DoGet", body=b"\x00garbage"),
        "INVALID_ARGUMENT",
        InvalidRequest,
        r"^invalid ticket: ",
    ),
    Case(
        "garbage command descriptor",
        lambda w: RawCall("GetFlightInfo", body=b"{not json"),
        "INVALID_ARGUMENT",
        InvalidRequest,
        r"^invalid command: ",
    ),
    Case(
        "garbage do_put command",
        lambda w: RawCall("DoPut", body=b"\x00garbage"),
        "INVALID_ARGUMENT",
        InvalidRequest,
        r"^invalid put command: ",
    ),
    Case(
        "do_put path without a shard index",
        lambda w: RawCall("DoPut", path=(w.dataset_id, w.shardset_id, "first")),
        "INVALID_ARGUMENT",
        InvalidRequest,
        r"^do_put takes a path \[dataset_id, shardset_id, shard_index",
    ),
    # NOT_FOUND
    Case(
        "unknown action",
        lambda w: action("drop_everything", b"{}"),
        "NOT_FOUND",
        ActionNotFound,
        r"^no action 'drop_everything'; actions: ack, ",
    ),
    Case(
        "unknown dataset",
        lambda w: action("get_dataset", {"name": "nope"}),
        "NOT_FOUND",
        DatasetNotFound,
        r"^no dataset with name 'nope'$",
    ),
    Case(
        "unknown iteration",
        lambda w: action("get_iteration", {"iteration_id": "it-nope"}),
        "NOT_FOUND",
        IterationNotFound,
        r"it-nope",
    ),
    Case(
        "forged ticket of an unknown dataset",
        lambda w: RawCall(
            "DoGet", body=wire.encode(wire.ShardTicket(dataset_id="ds-nope", shard_index=0))
        ),
        "NOT_FOUND",
        DatasetNotFound,
        r"ds-nope",
    ),
    Case(
        "path descriptor of an unknown dataset",
        lambda w: RawCall("GetFlightInfo", path=("nope",)),
        "NOT_FOUND",
        DatasetNotFound,
        r"^no dataset named 'nope'",
    ),
    Case(
        "do_put to an unknown dataset",
        lambda w: RawCall("DoPut", path=("ds-nope", "ss-nope", "0")),
        "NOT_FOUND",
        DatasetNotFound,
        r"ds-nope",
    ),
    Case(
        "an iteration stream whose second shard file is gone",
        lambda w: RawCall("DoGet", body=w.vanishing_iteration),
        "NOT_FOUND",
        ShardNotFound,
        r"shard file file://.*gone/shard\.00000001\.parquet does not exist",
    ),
    # UNAVAILABLE
    Case(
        "a shard that storage cannot open (its file became a folder)",
        lambda w: RawCall("DoGet", body=w.broken_shard),
        "UNAVAILABLE",
        StorageError,
        r"^cannot open shard file://.*shard\.00000001\.parquet",
    ),
    # UNAUTHENTICATED
    Case(
        "no API key",
        lambda w: action("list_datasets", {}, token=None),
        "UNAUTHENTICATED",
        Unauthenticated,
        r"^this server needs an API key: pass api_key= to lavender\.init",
    ),
    Case(
        "a wrong API key on a stream",
        lambda w: RawCall("DoGet", body=w.broken_shard, token="wrong"),
        "UNAUTHENTICATED",
        Unauthenticated,
        r"^the API key is not valid$",
    ),
    # INTERNAL
    Case(
        "a plugin fails on a sample",
        lambda w: RawCall("DoGet", body=w.failing_iteration),
        "INTERNAL",
        TransformFailed,
        r"^preprocessor 'picky' failed on sample uid=0: ValueError: uid 0 is not welcome",
    ),
    Case(
        "a bug on the server",
        lambda w: action("crash", {}),
        "INTERNAL",
        ServerError,
        r"^unexpected ZeroDivisionError on the server \(ref [0-9a-f]{8}\); the server log has "
        r"the details$",
    ),
]
CASE_PARAMS = [pytest.param(case, id=case.description) for case in CASES]

# What pyarrow raises on the client for each status.
PYARROW_ERRORS: dict[str, type[Exception]] = {
    "NOT_FOUND": pa.ArrowKeyError,
    "INVALID_ARGUMENT": pa.ArrowInvalid,
    "UNAVAILABLE": flight.FlightUnavailableError,
    "UNAUTHENTICATED": flight.FlightUnauthenticatedError,
    "INTERNAL": flight.FlightInternalError,
}


def test_every_status_is_in_the_table() -> None:
    assert {case.status for case in CASES} == set(PYARROW_ERRORS)
    for case in CASES:
        assert case.cls.status.value == case.status, case.description


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_pyarrow_client_gets_the_status_and_one_clean_line(
    wire_world: WireWorld, case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    raw = flight.connect(wire_world.url)
    try:
        with pytest.raises(Exception) as info:
            case.call(wire_world).run(raw)
    finally:
        raw.close()
    exc = info.value
    assert isinstance(exc, PYARROW_ERRORS[case.status]), f"{type(exc).__name__}: {exc}"
    text = str(exc)
    assert leaks(text) == [], text
    line = text.split(". Detail: ", 1)[0]
    name, _, message = line.partition(": ")
    assert name == case.cls.__name__, text
    assert re.search(case.pattern, message), f"{message!r} !~ {case.pattern!r}"
    assert BUG_MESSAGE not in text
    rebuilt = from_flight_error(exc)
    assert type(rebuilt) is case.cls
    assert rebuilt.message == message
    if case.cls is ServerError:  # the details went to the server log, with the same ref
        ref = re.search(r"ref ([0-9a-f]{8})", message)
        assert ref is not None
        logged = [r for r in caplog.records if ref.group(1) in r.getMessage()]
        assert logged and logged[0].exc_info is not None
        assert str(logged[0].exc_info[1]) == BUG_MESSAGE


def test_formatting_of_other_exceptions_is_untouched(wire_world: WireWorld) -> None:
    import traceback

    raw = flight.connect(wire_world.url)
    try:
        with pytest.raises(pa.ArrowKeyError):
            action("get_dataset", {"name": "nope"}).run(raw)  # installs the wrapper
    finally:
        raw.close()
    try:
        raise KeyError("a key")
    except KeyError as exc:
        text = "".join(traceback.format_exception(exc))
        old_style = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert text.startswith("Traceback (most recent call last):")
    assert 'test_wire_errors.py", line' in text
    assert text.endswith("KeyError: 'a key'\n")
    assert old_style == text


def test_a_long_message_is_cut_not_refused(wire_world: WireWorld) -> None:
    raw = flight.connect(wire_world.url)
    try:
        with pytest.raises(pa.ArrowKeyError) as info:
            action("é" * 3000, {}).run(raw)  # the message names the action
    finally:
        raw.close()
    line = str(info.value).split(". Detail: ", 1)[0]
    assert line.startswith("ActionNotFound: no action 'éééé")
    assert line.endswith("...")
    assert len(line.encode()) <= 1000
