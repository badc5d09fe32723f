"""The managing parts without a browser: a real server, the pages' params and what they say.

Iterations table (server-side pages and state filter), deletes and their refusals, nodes,
the login's key check, throughput that follows the work, and the UX notes' small things.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import ClientSettings, Iteration, LavenderClient
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.errors import wire_errors
from lavender_flight.panel_ui import (
    AddShardsetForm,
    DatasetPage,
    IterationPage,
    IterationsPage,
    IterationsTable,
    NodesPage,
    Throughput,
    arrow_frame,
    doc_html,
    key_matches,
)
from lavender_flight.panel_ui import login as login_module
from lavender_flight.panel_ui.nodes import NO_NODES_ACTION
from lavender_flight.panel_ui.shardsets import FORM_HINT
from lavender_flight.protocol.errors import ActionNotFound, IterationNotFound
from tests.panel_ui.conftest import write_dataset


def finish(dataset_id: str, iteration_id: str) -> None:
    for batch in Iteration.from_dataset(dataset_id, batch_size=10, iteration_id=iteration_id):
        del batch


@pytest.fixture
def held(client: LavenderClient) -> Iterator[list[Any]]:
    """Streams kept open by a test (jobs between two batches); closed however it ends."""
    streams: list[Any] = []
    yield streams
    for stream in streams:
        stream.close()


def hold(held: list[Any], dataset_id: str, iteration_id: str) -> None:
    stream = iter(Iteration.from_dataset(dataset_id, batch_size=5, iteration_id=iteration_id))
    held.append(stream)
    next(stream)


def ids(table: IterationsTable) -> list[str]:
    assert table.rows is not None
    return list(table.rows["id"])


def test_iterations_table_pages_and_filters_on_the_server(
    client: LavenderClient, data_dir: Path, held: list[Any]
) -> None:
    one = write_dataset("one", data_dir / "one", 1, 10)
    two = write_dataset("two", data_dir / "two", 1, 10)
    for index in range(5):
        finish(one, f"one-{index}")
    hold(held, two, "two-live")
    table = IterationsTable(client=client, limit=10)
    assert ids(table) == ["two-live", "one-4", "one-3", "one-2", "one-1", "one-0"]
    assert not table.has_more and "iterations 1-6<" in table._where.object

    table.param.limit.objects = [2, 10]  # a small page, for the test
    table.limit = 2
    assert ids(table) == ["two-live", "one-4"] and table.has_more
    table.next_page()
    assert table.offset == 2 and ids(table) == ["one-3", "one-2"]
    assert "iterations 3-4 (more on the next page)" in table._where.object
    table.next_page()
    table.next_page()  # no page after the last: stays
    assert table.offset == 4 and ids(table) == ["one-1", "one-0"] and not table.has_more
    table.state = "running"  # a filter goes back to the first page
    assert table.offset == 0 and ids(table) == ["two-live"]
    table.state = "done"
    table.dataset_id = two
    assert ids(table) == [] and "No done iterations." in table._table.object


def test_deleting_a_live_iteration_from_the_table_needs_force(
    client: LavenderClient, data_dir: Path, held: list[Any]
) -> None:
    dataset_id = write_dataset("ds", data_dir / "main", 1, 20)
    finish(dataset_id, "old")
    hold(held, dataset_id, "live")
    table = IterationsTable(client=client, dataset_id=dataset_id, show_dataset=False)
    assert "dataset" not in table.rows.columns or "dataset" not in table._table.object
    table.selected = ["old", "live"]
    doomed = table.remover.ask()
    assert doomed is not None
    assert doomed.what == "2 iterations: live, old"
    assert doomed.live == "live (1 open stream)"

    assert table.remover.confirm() is False  # the live one refused, the done one gone
    assert "Deleted old. Live: live (1 open streams)" in table.remover.busy
    assert "tick the box below" in table.remover.busy
    assert ids(table) == ["live"] and table.selected == ["live"]
    assert table.remover.asking  # still open, with the force option

    table.remover.force = True
    assert table.remover.confirm() is True
    assert table.remover.message == "Deleted 1 iteration: live"
    assert ids(table) == []
    with pytest.raises(IterationNotFound):
        lavender.get_iteration("live")


def test_dataset_delete_names_what_goes_and_hides_the_page(
    client: LavenderClient, data_dir: Path
) -> None:
    dataset_id = write_dataset("gone", data_dir / "main", 2, 10, feature=data_dir / "feat")
    page = DatasetPage(client=client, dataset_id=dataset_id)
    page.__panel__()
    page.remover.cancel()
    assert page.remover.confirm() is False  # nothing asked, nothing deleted
    doomed = page.remover.ask()
    assert doomed is not None and doomed.what == f"dataset 'gone' ({dataset_id})"
    assert doomed.consequences.startswith("Its 2 shardsets (20 samples)") and doomed.live == ""
    assert page.remover.confirm() is True
    assert page.message == f"Deleted dataset 'gone' ({dataset_id}); its shard files stay."
    assert not page.found and not page._body.visible and page._missing.visible
    assert lavender.list_datasets() == []


def test_iterations_page_with_an_unknown_dataset_says_so_and_shows_all(
    client: LavenderClient, data_dir: Path
) -> None:
    dataset_id = write_dataset("ds", data_dir / "main", 1, 10)
    finish(dataset_id, "it")
    page = IterationsPage(client=client, dataset_id="ds-nope")
    assert page.error == "DatasetNotFound: no dataset with id 'ds-nope': all shown"
    assert ids(page.table) == ["it"]
    assert page.datasets == {"all datasets": "", "ds": dataset_id}
    page.pick(dataset_id)
    assert page.table.dataset_id == dataset_id and ids(page.table) == ["it"]


def test_a_finished_iteration_has_no_pushback_and_no_zero_chart(
    client: LavenderClient, data_dir: Path
) -> None:
    dataset_id = write_dataset("flowers", data_dir / "main", 1, 10)
    for batch in Iteration.from_dataset(
        dataset_id, batch_size=10, iteration_id="over", shuffle=True, shuffle_seed=None
    ):
        del batch
    page = IterationPage(client=client, iteration_id="over")
    page.__panel__()
    assert page.progress is not None and page.progress.done
    assert page._pushback.disabled and page.pushback() is None
    assert not page._chart.visible and page._chart_box.objects == []
    assert "Finished: no work while this page is open." in page._rate_note.object
    assert 'href="dataset?id=' in page._summary.object and ">flowers</a>" in page._summary.object
    # the seed the server chose is shown, so the order can be reproduced
    assert "chosen by the server" in page._summary.object
    assert f"seed {page.progress.seed}" in page._summary.object

    missing = IterationPage(client=client, iteration_id="nope")
    missing.__panel__()
    assert missing.error.startswith("IterationNotFound: ") and not missing.found
    assert missing._pushback.disabled and missing.remover.disabled


class ServerWithoutNodes(LavenderFlightServer):
    """A server from before the ``list_nodes`` action."""

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Any:
        if action.type == "list_nodes":
            with wire_errors():
                raise ActionNotFound("no action 'list_nodes'")
        return super().do_action(context, action)


def test_nodes_page_lists_this_server_and_says_when_it_cannot(
    client: LavenderClient, server: LavenderFlightServer, tmp_path: Path
) -> None:
    page = NodesPage(client=client)
    page.__panel__()
    assert page.error == "" and page.nodes is not None
    (row,) = page.nodes.to_dict("records")
    assert row["location"] == f"grpc://127.0.0.1:{server.port}" and row["alive"] == "yes"
    assert "1 server on this catalog, 1 alive" in page._summary.object
    assert 'id="nodes-table"' in page._table.object

    catalog = Catalog(tmp_path / "older.db")
    older = ServerWithoutNodes(LavenderService(catalog), "grpc://127.0.0.1:0")
    conn = LavenderClient(ClientSettings(f"grpc://127.0.0.1:{older.port}", timeout=30.0))
    try:
        old_page = NodesPage(client=conn)
        assert old_page.message == NO_NODES_ACTION and old_page.error == ""
        assert not old_page.available
    finally:
        conn.close()
        older.shutdown()
        catalog.close()


class CountingDigest:
    """``hmac.compare_digest`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self._compare = hmac.compare_digest

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls += 1
        return self._compare(a, b)


def test_login_checks_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [b"first-key", b"second-key", b"third-key"]
    counting = CountingDigest()
    monkeypatch.setattr(login_module.hmac, "compare_digest", counting)
    assert key_matches("first-key", keys) and counting.calls == 3  # no early exit
    assert key_matches("third-key", keys) and counting.calls == 6
    assert not key_matches("first-ke", keys) and not key_matches("", keys)
    assert not key_matches("anything", [])


def test_throughput_of_a_steady_loop_is_flat_at_server_times() -> None:
    # the loop reports 50 samples every 0.25 s (200/s); the page polls every 0.4 s
    rates = Throughput(window=2.0)
    points = []
    for poll in range(1, 40):
        seen = poll * 0.4
        last_report = int(seen / 0.25) * 0.25
        points += rates.observe(100.0 + last_report, int(last_report / 0.25) * 50, seen)
    steady = [r for t, r in points if t >= 102.5]
    assert steady and all(abs(r - 200.0) < 1e-6 for r in steady)
    assert all(t >= 100.0 for t, _ in points)  # server clock, not page seconds
    # the loop stops: one point says 0, once
    idle = rates.observe(100.0 + last_report, int(last_report / 0.25) * 50, seen + 3.0)
    assert [r for _, r in idle] == [0.0]
    assert rates.observe(100.0 + last_report, int(last_report / 0.25) * 50, seen + 6.0) == []


def test_float32_values_read_as_pyarrow_prints_them() -> None:
    table = pa.table(
        {
            "x": pa.array([0.052231136709451675], pa.float32()),
            "v": pa.array([[0.1, 0.2]], pa.list_(pa.float32())),
            "d": [0.1],
        }
    )
    frame, numeric = arrow_frame(table)
    assert frame["x"][0] == "0.052231137" and str(frame["v"][0]) == "[0.1, 0.2]"
    assert frame["d"][0] == 0.1 and numeric == ["x", "d"]


def test_plugin_descriptions_show_no_raw_markup() -> None:
    assert doc_html("``column`` lies within ``[min, max]``") == (
        "<code>column</code> lies within <code>[min, max]</code>"
    )
    assert doc_html("see :class:`~a.b.Filter` and *this* <b>") == (
        "see <code>Filter</code> and <em>this</em> &lt;b&gt;"
    )


def test_infer_columns_error_speaks_to_the_form(client: LavenderClient, data_dir: Path) -> None:
    dataset_id = lavender.create_dataset("ds").id
    (data_dir / "empty").mkdir()
    form = AddShardsetForm(client=client, dataset_id=dataset_id)
    form.location = (data_dir / "empty").as_uri()
    assert form.infer() is None
    assert FORM_HINT in form.error and "columns=[" not in form.error


def test_nodes_page_shows_the_samples_a_busy_server_sends(
    client: LavenderClient, data_dir: Path
) -> None:
    dataset_id = write_dataset("ds", data_dir / "main", 2, 100)
    stream = iter(Iteration.from_dataset(dataset_id, batch_size=2, iteration_id="busy"))
    page = NodesPage(client=client)
    try:
        deadline = time.monotonic() + 20
        seen: list[tuple[int, float]] = []
        while time.monotonic() < deadline:
            next(stream)  # a loop at about 40 samples/s, for the heartbeats to measure
            time.sleep(0.05)
            page.refresh()
            assert page.nodes is not None
            (row,) = page.nodes.to_dict("records")
            seen.append((row["streams"], row["samples/s"]))
            if row["streams"] == 1 and row["samples/s"] > 0:
                break
        assert seen[-1][0] == 1 and seen[-1][1] > 0, seen[-5:]
        assert "1 stream · " in page._summary.object
    finally:
        stream.close()
