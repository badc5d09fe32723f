"""Bad input: every decoder either parses a payload or says ``InvalidRequest``, and through a
live server garbage, truncated or forged payloads get a clear error and change nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from lavender_flight.catalog import Catalog
from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient, domain_error
from lavender_flight.flight_server.server import ACTIONS
from lavender_flight.protocol import wire
from lavender_flight.protocol.errors import (
    InvalidArgument,
    InvalidRequest,
    LavenderError,
    NotFound,
    ServerError,
)
from lavender_flight.protocol.iterations import IterationCommand, IterationTicket, decode_ticket
from tests.conftest import call_options

MODELS: list[type[BaseModel]] = sorted(
    {spec.body for spec in ACTIONS.values()} | {IterationCommand, wire.PutShardCommand},
    key=lambda m: m.__name__,
)
FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 80), max_value=1 << 80)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)
FIELD_NAMES = sorted(
    {name for model in MODELS for name in model.model_fields} | {"kind", "v", "seq", "bogus"}
)
# objects shaped like payloads: real field names with any values
payload_like = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=6)


def decodes_or_says_invalid(model: type[BaseModel], payload: bytes) -> None:
    try:
        wire.decode(model, payload, "body")
    except InvalidRequest as exc:
        assert str(exc).startswith(("invalid body: ", "body is "))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@FAST
@given(payload=st.binary(max_size=200))
def test_random_bytes(model: type[BaseModel], payload: bytes) -> None:
    decodes_or_says_invalid(model, payload)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@FAST
@given(value=json_values | payload_like)
def test_any_json(model: type[BaseModel], value: Any) -> None:
    decodes_or_says_invalid(model, json.dumps(value).encode())


@FAST
@given(payload=st.binary(max_size=200) | (json_values | payload_like).map(
    lambda v: json.dumps(v).encode()
))  # fmt: skip
def test_tickets(payload: bytes) -> None:
    try:
        decode_ticket(payload)
    except InvalidRequest as exc:
        assert str(exc).startswith("invalid ticket: ")


def test_oversized_and_deeply_nested_payloads_are_refused() -> None:
    huge = json.dumps({"name": "x" * (wire.MAX_PAYLOAD_BYTES + 1)}).encode()
    with pytest.raises(InvalidRequest, match="bytes; the limit is"):
        wire.decode(wire.CreateDatasetBody, huge, "create_dataset body")
    with pytest.raises(InvalidRequest, match="bytes; the limit is"):
        decode_ticket(huge)
    deep = ("[" * 5000 + "]" * 5000).encode()
    body = b'{"dataset_id": "d", "location": "file:///x", "storage_options": {"a": ' + deep + b"}}"
    decodes_or_says_invalid(wire.CreateShardsetBody, body)
    with pytest.raises(InvalidRequest, match="batch_size: Input should be less than"):
        wire.decode(
            IterationCommand,
            b'{"spec": {"dataset_id": "d", "batch_size": 100000000000000000000000}}',
            "body",
        )


def test_every_truncation_of_a_real_ticket_is_invalid_not_a_crash() -> None:
    ticket = wire.encode(IterationTicket(iteration_id="it-1", rank=3, worker=1, num_workers=2))
    for cut in range(len(ticket)):
        with pytest.raises(InvalidRequest, match="invalid ticket"):
            decode_ticket(ticket[:cut])


# -- through a live server ----------------------------------------------------------------


def snapshot(catalog: Catalog) -> Any:
    """Everything a user could see change: datasets, shardsets, shards, iteration progress."""
    datasets = [d.model_dump() for d in catalog.list_datasets()]
    progress = [
        (record.id, [r.model_dump() for r in catalog.load_progress(record.id)])
        for record in catalog.list_iterations()
    ]
    return datasets, progress


@pytest.fixture
def populated(client: LavenderClient, data_dir: Path) -> str:
    """A dataset of 40 rows and a half-consumed iteration; the iteration's id."""
    dataset = lavender.create_dataset(name="fuzzed")
    shardset = lavender.create_shardset(
        dataset.id,
        data_dir.as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="text", type_="str"),
        ],
    )
    Writer.get(dataset_id=dataset.id, shardset_id=shardset.id).write(
        [{"uid": u, "text": str(u)} for u in range(40)], shard_index=0
    )
    iteration = Iteration.from_dataset(dataset.id, batch_size=4)
    stream = iter(iteration)
    for _ in range(3):
        next(stream)
    return iteration.id


def put(raw_flight: flight.FlightClient, descriptor: flight.FlightDescriptor) -> None:
    table = pa.table({"uid": [1, 2], "text": ["a", "b"]})
    writer, answers = raw_flight.do_put(descriptor, table.schema, call_options())
    try:
        writer.write_table(table)
        writer.done_writing()
        answers.read()
    finally:
        writer.close()


def error_of(call: Any) -> LavenderError | None:
    try:
        call()
    except (flight.FlightError, Exception) as exc:
        return domain_error(exc)
    return None


@FAST
@given(name=st.sampled_from(sorted(ACTIONS)), value=json_values | payload_like)
def test_fuzzed_actions_get_a_clear_error_and_change_nothing(
    populated: str, catalog: Catalog, raw_flight: flight.FlightClient, name: str, value: Any
) -> None:
    body = json.dumps(value).encode()
    try:
        wire.decode(ACTIONS[name].body, body, "body")
    except InvalidRequest:
        pass
    else:
        assume(False)  # a valid request may change things; that is not what this is about
    before = snapshot(catalog)
    error = error_of(lambda: list(raw_flight.do_action(flight.Action(name, body), call_options())))
    assert isinstance(error, InvalidRequest), error
    assert f"invalid {name} body" in str(error)
    assert snapshot(catalog) == before


@FAST
@given(value=st.binary(max_size=120) | (json_values | payload_like).map(
    lambda v: json.dumps(v).encode()
))  # fmt: skip
def test_fuzzed_tickets_and_commands_never_crash_the_server(
    populated: str, catalog: Catalog, raw_flight: flight.FlightClient, value: bytes
) -> None:
    before = snapshot(catalog)
    for call in (
        lambda: raw_flight.do_get(flight.Ticket(value), call_options()).read_all(),
        lambda: raw_flight.get_flight_info(
            flight.FlightDescriptor.for_command(value), call_options()
        ),
        lambda: put(raw_flight, flight.FlightDescriptor.for_command(value)),
    ):
        error = error_of(call)
        assert not isinstance(error, ServerError), error
    assert snapshot(catalog) == before


def test_forged_tickets_name_what_is_wrong_and_change_nothing(
    populated: str, catalog: Catalog, raw_flight: flight.FlightClient
) -> None:
    before = snapshot(catalog)
    cases: list[tuple[dict[str, Any], type[LavenderError], str]] = [
        ({"kind": "iteration", "iteration_id": "it-forged"}, NotFound, "it-forged"),
        ({"kind": "iteration", "iteration_id": populated, "rank": 7}, InvalidArgument,
         "rank 7 is outside"),
        ({"kind": "iteration", "iteration_id": populated, "rank": -1}, InvalidRequest,
         "rank: Input should be greater than or equal to 0"),
        ({"kind": "iteration", "iteration_id": "../../etc"}, InvalidRequest, "iteration_id"),
        ({"kind": "iteration", "iteration_id": populated, "admin": True}, InvalidRequest,
         "admin: Extra inputs are not permitted"),
        ({"kind": "shard", "dataset_id": "ds-nope", "shard_index": 0}, NotFound, "ds-nope"),
        ({"kind": "shard", "dataset_id": "x", "shard_index": "zero"}, InvalidRequest,
         "shard_index"),
        ({"kind": "pickle", "data": "gASV"}, InvalidRequest, "invalid ticket"),
    ]  # fmt: skip
    for ticket, cls, text in cases:
        forged = flight.Ticket(json.dumps(ticket).encode())
        error = error_of(lambda t=forged: raw_flight.do_get(t, call_options()).read_all())
        assert isinstance(error, cls), (ticket, error)
        assert text in str(error), (ticket, error)
    assert snapshot(catalog) == before


def test_huge_or_negative_acks_are_refused_and_change_nothing(
    populated: str, catalog: Catalog, client: LavenderClient
) -> None:
    before = snapshot(catalog)
    for seq, problem in (
        ([[0, 10**30]], "seq.0.1: Input should be less than or equal to"),
        ([[-5, 3]], "seq.0.0: Input should be greater than or equal to 0"),
        ([[0, 1, 2]], "seq.0: Tuple should have at most 2 items"),
        ("0-10", "seq: Input should be a valid array"),
    ):
        with pytest.raises(InvalidRequest, match=re.escape(problem)):
            client.action_json("ack", {"iteration_id": populated, "rank": 0, "seq": seq})
    assert snapshot(catalog) == before
