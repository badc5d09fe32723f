"""Every action answers a typed model, produced by the server and parsed by the client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.flight as flight
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import ClientSettings, Iteration, LavenderClient, Writer
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.protocol import Dataset, wire
from lavender_flight.protocol.errors import DatasetNotFound, ServerError
from lavender_flight.protocol.iterations import IterationBody
from tests.conftest import CALL_TIMEOUT, call_options

ROWS = 40


@pytest.fixture
def own(api_url: str) -> Iterator[LavenderClient]:
    """A client of the test's own (no default client involved)."""
    with LavenderClient(ClientSettings(api_url, timeout=CALL_TIMEOUT)) as client:
        yield client


@pytest.fixture
def dataset(own: LavenderClient, data_dir: Path) -> Dataset:
    """``ROWS`` samples in one shard, written through ``own``."""
    created = own.create_dataset("answers")
    shardset = own.create_shardset(
        created.id, (data_dir / "main").as_uri(), [{"name": "uid", "type": "int"}]
    )
    Writer.get(dataset_id=created.id, shardset_id=shardset.id, client=own).write(
        [{"uid": u} for u in range(ROWS)]
    )
    return own.get_dataset(created.id)


def raw_answer(raw: flight.FlightClient, name: str, body: wire.BaseModel) -> bytes:
    (result,) = raw.do_action(flight.Action(name, wire.encode(body)), call_options())
    return bytes(result.body.to_pybytes())


def test_deletes_answer_what_they_deleted(own: LavenderClient, dataset: Dataset) -> None:
    shardset = dataset.shardsets[0]
    iteration = Iteration.from_dataset(dataset.id, batch_size=8, client=own)
    assert own.delete_iteration(iteration.id) == wire.Deleted(deleted=iteration.id)
    assert own.delete_shardset(dataset.id, shardset.id) == wire.Deleted(deleted=shardset.id)
    answer = own.delete_dataset(dataset.id)
    assert (answer.deleted, answer.v) == (dataset.id, 1)
    with pytest.raises(DatasetNotFound):
        own.get_dataset(dataset.id)


def test_pushback_and_ack_answer_counts(
    own: LavenderClient, dataset: Dataset, raw_flight: flight.FlightClient
) -> None:
    iteration = Iteration.from_dataset(dataset.id, batch_size=8, format="arrow", client=own)
    batches = iter(iteration)
    first = next(batches)  # taken, not completed: in flight
    pushed = own.pushback(iteration.id)
    assert isinstance(pushed, int) and pushed >= first.num_rows
    body = IterationBody(iteration_id=iteration.id)
    again = wire.PushedBack.model_validate_json(raw_answer(raw_flight, "pushback", body))
    assert again.pushed_back >= 0
    ack = wire.Acked.model_validate_json(
        own.action("ack", {"iteration_id": iteration.id, "rank": 0, "seq": [[0, 1]]})
    )
    assert ack.completed in (0, 1)
    batches.close()  # type: ignore[attr-defined]


def test_list_plugins_is_a_plugin_list(own: LavenderClient) -> None:
    listed = own.list_plugins()
    assert isinstance(listed, wire.PluginList) and listed.problems == []
    by_name = {(p.kind, p.name): p for p in listed.plugins}
    builtins = {("filter", "sample"), ("collater", "arrow"), ("preprocessor", "byte_tokenize")}
    assert builtins <= set(by_name)
    rate, seed, *_ = by_name[("filter", "sample")].parameters
    assert rate == wire.PluginParameter(name="rate", type="float", default=0.1, required=False)
    assert (seed.name, seed.default) == ("seed", 0)
    assert by_name[("collater", "arrow")].parameters == []
    raw = own.action_json("list_plugins")
    assert [p["name"] for p in raw["plugins"]] == [p.name for p in listed.plugins]


class BareListServer(LavenderFlightServer):
    """A server whose ``list_plugins`` answers a bare list (another program's shape)."""

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Any:
        if action.type == "list_plugins":
            return iter([b'[{"name": "x"}]'])
        return super().do_action(context, action)


def test_an_answer_of_another_shape_is_a_server_error(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "other.db")
    server = BareListServer(LavenderService(catalog), "grpc://127.0.0.1:0")
    try:
        settings = ClientSettings(f"grpc://127.0.0.1:{server.port}", timeout=CALL_TIMEOUT)
        with LavenderClient(settings) as client, pytest.raises(ServerError) as refused:
            client.list_plugins()
    finally:
        server.shutdown()
        catalog.close()
    text = str(refused.value)
    assert text.startswith("the server's answer to list_plugins does not fit this client: ")
    assert "\n" not in text
