"""Each page's logic without a browser: a real server, the pages' params, what they show."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.flight as flight
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import ClientSettings, Iteration, LavenderClient, Writer
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.errors import wire_errors
from lavender_flight.panel_ui import (
    AddShardsetForm,
    DatasetPage,
    DatasetsPage,
    IterationPage,
    PluginsPage,
    ShardsetPage,
    columns_to_text,
    describe_error,
    parse_columns,
)
from lavender_flight.panel_ui.common import html_table
from lavender_flight.panel_ui.plugins import NO_ACTION, NO_PLUGINS, describe_parameters
from lavender_flight.protocol.errors import ActionNotFound, InvalidArgument
from lavender_flight.transforms import Plugins
from tests.panel_ui.conftest import write_dataset, write_parquet, write_text_shard

INFER_MISSING = "infer_columns action not on the server yet"


class ServerBeforeTheDashboard(LavenderFlightServer):
    """A server without the actions the dashboard added (``infer_columns``, ``list_plugins``)."""

    MISSING = ("infer_columns", "list_plugins")

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Any:
        if action.type in self.MISSING:
            with wire_errors():
                raise ActionNotFound(f"no action {action.type!r}")
        return super().do_action(context, action)


@pytest.fixture
def older_client(tmp_path: Path) -> Iterator[LavenderClient]:
    """A connection to a server that lacks the newer actions."""
    catalog = Catalog(tmp_path / "older.db")
    server = ServerBeforeTheDashboard(LavenderService(catalog), "grpc://127.0.0.1:0")
    conn = LavenderClient(ClientSettings(f"grpc://127.0.0.1:{server.port}", timeout=30.0))
    yield conn
    conn.close()
    server.shutdown()
    catalog.close()


# -- datasets ----------------------------------------------------------------------------


def test_datasets_list_and_create(client: LavenderClient) -> None:
    page = DatasetsPage(client=client)
    assert page.datasets is not None and page.datasets.empty
    assert "No datasets yet" in page._table.object

    page.new_name = "captions"
    created = page.create()
    assert created is not None and created.name == "captions"
    assert page.error == "" and page.message == f"Created dataset 'captions' ({created.id})"
    assert page.new_name == ""
    rows = page.datasets.to_dict("records")
    assert [(r["name"], r["id"], r["shardsets"], r["samples"]) for r in rows] == [
        ("captions", created.id, 0, 0)
    ]
    assert f'href="dataset?id={created.id}"' in page._table.object

    page.new_name = "captions"
    assert page.create() is None
    assert page.error == "DatasetAlreadyExists: a dataset named 'captions' exists already"
    page.new_name = "  "
    assert page.create() is None
    assert page.error == "InvalidArgument: a dataset needs a name"


def test_datasets_show_samples_and_escape_names(client: LavenderClient, data_dir: Path) -> None:
    write_dataset("<b>bold&co", data_dir / "main", shards=2, rows=5)
    page = DatasetsPage(client=client)
    assert page.datasets.to_dict("records")[0]["samples"] == 10
    assert "&lt;b&gt;bold&amp;co</a>" in page._table.object
    assert "<b>" not in page._table.object


def test_unreachable_server_is_a_message(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "gone.db")
    server = LavenderFlightServer(LavenderService(catalog), "grpc://127.0.0.1:0")
    url = f"grpc://127.0.0.1:{server.port}"
    server.shutdown()
    catalog.close()
    with LavenderClient(ClientSettings(url, timeout=5.0)) as conn:
        page = DatasetsPage(client=conn)
    assert page.error.startswith("ServerUnavailable: cannot reach the Lavender Flight server")
    assert "\n" not in page.error and "Traceback" not in page.error


def test_pages_call_their_own_client_never_the_default_one(
    api_url: str, reset_client: None
) -> None:
    with pytest.raises(InvalidArgument, match="is an HTTP address"):
        lavender.init("http://localhost:8000")  # a user's script in the same process
    with LavenderClient(ClientSettings(api_url, timeout=30.0)) as conn:
        page = DatasetsPage(client=conn)
        page.new_name = "mine"
        assert page.create() is not None
    assert page.error == "" and page.datasets["name"].tolist() == ["mine"]
    assert lavender._client is None


# -- one dataset -------------------------------------------------------------------------


def test_dataset_shardsets_preview_and_paging(client: LavenderClient, data_dir: Path) -> None:
    dataset_id = write_dataset("ds", data_dir / "main", 3, 10, feature=data_dir / "feat")
    page = DatasetPage(client=client, dataset_id=dataset_id)
    assert page.error == ""
    shardsets = page.shardsets.to_dict("records")
    assert [(s["main"], s["columns"], s["shards"], s["samples"]) for s in shardsets] == [
        ("yes", "uid: int64, text: string", 3, 30),
        ("", "uid: int64, score: float64", 1, 30),
    ]
    assert page.param.preview_columns.objects == ["text", "score"]
    assert page.preview_columns == ["text", "score"]
    assert list(page.preview.columns) == ["uid", "text", "score"]
    assert page.preview["uid"].tolist() == list(range(10))
    assert page.preview["score"].tolist() == [u / 10 for u in range(10)]
    assert "rows 1-10 of 30" in page._rows.object

    page.next_page()
    assert page.offset == 10 and page.preview["uid"].tolist() == list(range(10, 20))
    page.preview_columns = ["score"]
    assert list(page.preview.columns) == ["uid", "score"]
    page.refresh()  # the user's pick stays
    assert page.preview_columns == ["score"] and page.offset == 10
    page.limit = 25
    assert page.preview["uid"].tolist() == list(range(10, 30))
    page.next_page()  # nothing after row 30: stays
    assert page.offset == 10
    page.previous_page()
    assert page.offset == 0 and page.preview["uid"].tolist() == list(range(25))
    assert page._previous.disabled and not page._next.disabled


def test_dataset_lists_its_iterations(client: LavenderClient, data_dir: Path) -> None:
    dataset_id = write_dataset("ds", data_dir / "main", 2, 10)
    for batch in Iteration.from_dataset(dataset_id, batch_size=4, iteration_id="epoch-1"):
        del batch
    page = DatasetPage(client=client, dataset_id=dataset_id)
    rows = page.iterations.to_dict("records")
    assert [(r["id"], r["total"], r["completed"], r["done"]) for r in rows] == [
        ("epoch-1", 20, 20, "yes")
    ]
    assert 'href="iteration?id=epoch-1"' in page.iterations_table._table.object


def test_unknown_dataset_is_a_message(client: LavenderClient) -> None:
    page = DatasetPage(client=client, dataset_id="ds-nope")
    assert page.error.startswith("DatasetNotFound: ")
    assert "ds-nope" in page.error
    assert page.preview is None


# -- adding a shardset -------------------------------------------------------------------


def test_columns_as_text_lines() -> None:
    columns = parse_columns("uid: int\n\n  text : str  # the caption\nv: struct<a: int32>\n")
    assert [(c.name, c.type_, c.description) for c in columns] == [
        ("uid", "int64", ""),
        ("text", "string", "the caption"),
        ("v", "struct<a: int32>", ""),
    ]
    assert (
        columns_to_text(columns) == "uid: int64\ntext: string  # the caption\nv: struct<a: int32>"
    )
    with pytest.raises(InvalidArgument, match=r"column line 2: write 'name: type', got 'text'"):
        parse_columns("uid: int\ntext")
    with pytest.raises(InvalidArgument, match="column line 1: type_: "):
        parse_columns("uid: nosuchtype")


def test_add_shardset_infers_edits_and_saves(client: LavenderClient, data_dir: Path) -> None:
    dataset = lavender.create_dataset("photos")
    location = data_dir / "captions"
    write_parquet(location / "part-0.parquet", range(0, 5))
    form = AddShardsetForm(client=client, dataset_id=dataset.id)
    form.location = location.as_uri()
    found = form.infer()
    if found is None and "infer_columns" in form.error:
        pytest.skip(INFER_MISSING)
    assert form.error == ""
    assert form.columns_text == "uid: int64\ncaption: string\nwidth: int32"
    assert form.message == "Found 3 columns in the first shard: edit them, then Save."

    form.columns_text = "uid: int64\ncaption: string\nwidth: int64"
    assert form.save() is None
    assert form.error.startswith("SchemaMismatch: shard ")
    assert form.error.endswith("part-0.parquet: column 'width' is int32, declared int64")

    form.columns_text = "uid: int64\ncaption: string  # what it shows\nwidth: int32  # pixels"
    shardset = form.save()
    assert shardset is not None and form.error == ""
    assert [(c.name, c.type_, c.description) for c in shardset.columns] == [
        ("uid", "int64", ""),
        ("caption", "string", "what it shows"),
        ("width", "int32", "pixels"),
    ]
    assert (shardset.shard_count, shardset.total_samples, shardset.is_main) == (1, 5, True)
    assert form.created == shardset
    assert form.message == f"Created shardset {shardset.id}: 1 shards, 5 samples"
    assert form.location == "" and form.columns_text == ""


def test_add_shardset_errors_are_messages(client: LavenderClient, data_dir: Path) -> None:
    dataset = lavender.create_dataset("photos")
    form = AddShardsetForm(client=client, dataset_id=dataset.id)
    assert form.infer() is None and form.error.startswith("InvalidArgument: type the location")
    form.location = (data_dir / "empty").as_uri()
    assert form.infer() is None
    if "infer_columns" not in form.error:  # the action exists: it says why it found nothing
        assert form.error.startswith("InvalidArgument: no shard file at")
    form.columns_text = "uid: int\ncaption"
    assert form.save() is None
    assert form.error == "InvalidArgument: column line 2: write 'name: type', got 'caption'"
    form.columns_text = "caption: str"
    assert form.save() is None
    assert form.error.startswith("InvalidArgument: ") and "uid" in form.error


def test_add_shardset_on_a_server_without_infer(older_client: LavenderClient) -> None:
    dataset = DatasetsPage(client=older_client, new_name="old").create()
    assert dataset is not None
    form = AddShardsetForm(client=older_client, dataset_id=dataset.id, location="memory://x")
    assert form.infer() is None
    assert form.error == (
        "This server cannot infer columns (it has no 'infer_columns' action): "
        "type them in as 'name: type' lines."
    )


def test_dataset_page_refreshes_after_a_shardset_is_added(
    client: LavenderClient, data_dir: Path
) -> None:
    dataset = lavender.create_dataset("later")
    page = DatasetPage(client=client, dataset_id=dataset.id)
    assert page.shardsets.empty and "No shardsets yet" in page._shardsets.object
    page.add_shardset.location = (data_dir / "new").as_uri()
    page.add_shardset.columns_text = "uid: int\ntext: str"
    assert page.add_shardset.save() is not None
    assert page.shardsets["columns"].tolist() == ["uid: int64, text: string"]
    assert page.preview_columns == ["text"]  # a new column starts picked
    assert list(page.preview.columns) == ["uid", "text"] and page.preview.empty


# -- one shardset ------------------------------------------------------------------------


def test_shardset_shards_and_sync(client: LavenderClient, data_dir: Path) -> None:
    location = data_dir / "main"
    dataset_id = write_dataset("ds", location, shards=2, rows=10)
    shardset_id = lavender.get_dataset(dataset_id).shardsets[0].id
    page = ShardsetPage(client=client, dataset_id=dataset_id, shardset_id=shardset_id)
    rows = page.shards.to_dict("records")
    assert [(r["index"], r["file"], r["rows"], r["uid range"]) for r in rows] == [
        (0, "shard.00000000.parquet", 10, "0 - 9"),
        (1, "shard.00000001.parquet", 10, "10 - 19"),
    ]
    assert 'id="columns-table"' in page._summary.object and "a caption" in page._summary.object

    nothing = page.sync()
    assert nothing is not None and nothing.added == []
    assert page.message.startswith("Sync found 0 new shard files, 0 changed, 0 removed")

    write_text_shard(location / "shard.00000002.parquet", range(20, 25))
    result = page.sync()
    assert result is not None and [s.num_rows for s in result.added] == [5]
    assert page.message == (
        "Sync found 1 new shard files (shard.00000002.parquet), 0 changed, 0 removed: "
        "3 shards, 25 samples"
    )
    assert page.shards["file"].tolist()[-1] == "shard.00000002.parquet"
    assert page.shardset is not None and page.shardset.total_samples == 25


def test_a_feature_shardset_page_says_how_its_shards_join(
    client: LavenderClient, data_dir: Path
) -> None:
    dataset_id = write_dataset("ds", data_dir / "main", shards=2, rows=10)  # uids 0-9, 10-19
    feature = lavender.create_shardset(
        dataset_id,
        (data_dir / "f").as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="score", type_="float"),
        ],
    )
    writer = Writer.get(dataset_id=dataset_id, shardset_id=feature.id)
    writer.write([{"uid": u, "score": u / 2} for u in range(10)], shard_index=0)  # aligned
    writer.write([{"uid": u, "score": u / 2} for u in range(19, 9, -1)][:7], shard_index=1)

    page = ShardsetPage(client=client, dataset_id=dataset_id, shardset_id=feature.id)

    assert page.shards["joins"].tolist() == ["aligned with main shard 0", "by uid"]
    assert page.aligned == 1
    assert "1 of 2 shards aligned with a main shard" in page._summary.object
    main_id = lavender.get_dataset(dataset_id).main_shardset.id  # type: ignore[union-attr]
    main = ShardsetPage(client=client, dataset_id=dataset_id, shardset_id=main_id)
    assert main.shards["joins"].tolist() == ["main", "main"] and main.aligned is None
    assert 'id="shardset-joins"' not in main._summary.object


def test_sync_errors_are_messages(client: LavenderClient, data_dir: Path) -> None:
    location = data_dir / "main"
    dataset_id = write_dataset("ds", location, shards=1, rows=5)
    shardset_id = lavender.get_dataset(dataset_id).shardsets[0].id
    page = ShardsetPage(client=client, dataset_id=dataset_id, shardset_id=shardset_id)
    write_parquet(location / "shard.00000001.parquet", range(5, 8))  # other columns
    assert page.sync() is None
    assert page.error.startswith("SchemaMismatch: ") and "shard.00000001.parquet" in page.error
    missing = ShardsetPage(client=client, dataset_id=dataset_id, shardset_id="ss-nope")
    assert missing.error.startswith("ShardsetNotFound: ")


# -- iterations --------------------------------------------------------------------------


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {timeout}s")
        time.sleep(0.05)


def test_iteration_progress_throughput_and_pushback(client: LavenderClient, data_dir: Path) -> None:
    dataset_id = write_dataset("ds", data_dir / "main", shards=4, rows=50)
    clock = FakeClock()
    page = IterationPage(client=client, iteration_id="live", clock=clock, window=120.0)
    assert page.error.startswith("IterationNotFound: ")

    iteration = Iteration.from_dataset(dataset_id, batch_size=10, iteration_id="live")
    assert iteration.id == "live"  # reading the id creates it on the server
    stream = iter(iteration)
    try:
        page.refresh()
        assert page.error == ""
        assert page.progress is not None and page.progress.total == 200
        assert page.throughput is None  # one read: no rate yet
        started = page.progress.updated_at

        held = [next(stream)["uid"] for _ in range(4)]  # 3 batches completed, the 4th in use
        wait_until(lambda: lavender.get_iteration("live").completed == 30)
        clock.now += 2.0
        page.refresh()
        assert page.progress.completed == 30
        # the rate follows the server's clock (when the completions were recorded), not
        # the page's polls: 30 samples between the two changes the server recorded
        changed = page.progress.updated_at
        rate = round(30 / (changed - started), 3)
        assert page.throughput.to_dict("records") == [{"time": changed, "samples_per_s": rate}]
        assert page._source.data["samples_per_s"] == [rate]
        bars = {name: (bar.value, bar.max) for name, bar in page.bars.items()}
        assert bars["completed"] == (30, 200) and bars["filtered"] == (0, 200)
        assert bars["current"][0] >= 40 and bars["failed"] == (0, 200)
        assert 'id="lf-completed">30</b> / 200 (15%)' in page._labels["completed"].object
        assert 'id="lf-epoch">0</b>' in page._summary.object
        ranks = page.ranks.to_dict("records")
        assert [(r["rank"], r["epoch"], r["completed"]) for r in ranks] == [(0, 0, 30)]

        inflight = page.inflight.to_dict("records")
        assert [r["rank"] for r in inflight] == [0]
        assert inflight[0]["samples"] == page.progress.current - 30
        assert inflight[0]["positions"].startswith(", ".join(str(u) for u in held[3]))

        # sent ahead of the loop: pushed back too. The window follows the loop's pace both
        # ways, so what was sent under a larger one may stand above the limit now; with the
        # loop idle (no report, the window stays) the stream only claims up to the limit
        # between the page's read and the pushback.
        ahead = page.progress.read_ahead
        limit = page.progress.ranks[0].read_ahead_limit
        assert limit is not None and limit >= 2 * 10  # at least 2 batches
        pushed = page.pushback()
        assert pushed is not None
        held_now = inflight[0]["samples"]
        assert held_now + ahead <= pushed <= held_now + max(ahead, limit)
        assert page.message == f"Pushed back {pushed} in-flight samples: they return to the queue."
        assert page.inflight.empty and "Nothing in flight." in page._inflight.object
        assert 'id="lf-inflight">0</b>' in page._summary.object
    finally:
        stream.close()


def test_iteration_poll_errors_clear_when_the_server_answers(client: LavenderClient) -> None:
    page = IterationPage(client=client, iteration_id="not-yet")
    assert page.error.startswith("IterationNotFound: ")
    page.iteration_id = "bad id"
    page.refresh()
    assert page.error.startswith("InvalidArgument: invalid arguments: iteration_id")


# -- plugins -----------------------------------------------------------------------------


def test_plugins_page_lists_the_servers_plugins(client: LavenderClient) -> None:
    page = PluginsPage(client=client)
    assert page.error == "" and page.available
    assert list(page.plugins.columns) == ["kind", "name", "parameters", "description", "source"]
    listed = lavender.list_plugins().plugins
    assert page.plugins["name"].tolist() == [p.name for p in listed]
    if listed:
        assert page.message == "" and 'id="plugins-table"' in page._table.object
    else:
        assert page.message == NO_PLUGINS


def test_plugins_page_with_no_plugins(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "bare.db")
    server = LavenderFlightServer(LavenderService(catalog), "grpc://127.0.0.1:0", Plugins())
    try:
        settings = ClientSettings(f"grpc://127.0.0.1:{server.port}", timeout=30.0)
        with LavenderClient(settings) as conn:
            page = PluginsPage(client=conn)
    finally:
        server.shutdown()
        catalog.close()
    assert page.error == "" and page.plugins.empty
    assert page.message == NO_PLUGINS == "No plugins installed."


def test_plugins_page_on_a_server_without_the_action(older_client: LavenderClient) -> None:
    page = PluginsPage(client=older_client)
    assert page.error == "" and not page.available
    assert page.message == NO_ACTION
    assert page.plugins is None and page._table.object == ""


def test_plugin_parameters_in_one_line() -> None:
    assert describe_parameters(None) == ""
    assert (
        describe_parameters(
            [
                {"name": "rate", "type": "float", "default": 0.1, "required": False},
                {"name": "column", "type": "str", "required": True},
            ]
        )
        == "rate: float = 0.1, column: str"
    )
    assert describe_parameters({"seed": "int", "k": {"type": "int", "default": 3}}) == (
        "seed: int, k: int = 3"
    )


# -- shared pieces -----------------------------------------------------------------------


def test_errors_read_as_one_line() -> None:
    assert describe_error(InvalidArgument("bad\n  thing")) == "InvalidArgument: bad thing"
    assert describe_error(RuntimeError("")) == "RuntimeError: no details"


def test_tables_escape_every_value() -> None:
    frame = pd.DataFrame([{"name": "<script>x</script>", "n": 3, "b": b"\x01\x02"}])
    shown = html_table(frame, "t")
    assert "&lt;script&gt;" in shown and "<script>" not in shown
    assert '<td class="num">3</td>' in shown and "<td>0102</td>" in shown
    assert html_table(None, "t", empty="none <here>") == (
        '<p class="lf-empty" id="t-empty">none &lt;here&gt;</p>'
    )
