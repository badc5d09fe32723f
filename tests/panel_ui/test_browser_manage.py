"""Managing from a real Chromium: the iterations page, deletes with their confirmation, the
error page, the API-key login and the nodes page, as a user sees them.

Screenshots land where :func:`screenshot` puts them (``LAVENDER_FLIGHT_SHOTS`` to choose).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.auth import ApiKeyMiddlewareFactory
from lavender_flight.panel_ui import DashboardServer, serve_dashboard
from lavender_flight.panel_ui.login import WRONG_KEY
from lavender_flight.protocol.errors import IterationNotFound
from tests.panel_ui.conftest import WAIT_MS, Recorder, screenshot, write_dataset
from tests.panel_ui.test_browser import expect, open_page

pytestmark = pytest.mark.browser

Tab = tuple[Any, Recorder]
KEY = "key-one-0123456789"
OTHER_KEY = "key-two-9876543210"


def finish(dataset_id: str, iteration_id: str) -> None:
    """Run an iteration to its end (one pass)."""
    for batch in Iteration.from_dataset(dataset_id, batch_size=10, iteration_id=iteration_id):
        del batch


@pytest.fixture
def held(client: LavenderClient) -> Iterator[list[Iterator[Any]]]:
    """Streams a test keeps open (a training job between batches); closed at the end."""
    streams: list[Iterator[Any]] = []
    yield streams
    for stream in streams:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def hold(held: list[Iterator[Any]], dataset_id: str, iteration_id: str) -> None:
    """A job that took one batch of the iteration and keeps its stream open."""
    stream = iter(Iteration.from_dataset(dataset_id, batch_size=5, iteration_id=iteration_id))
    held.append(stream)
    next(stream)


def shown(tab: Any, selector: str) -> Any:
    """The visible elements of a selector (a closed confirmation keeps its old text)."""
    return tab.locator(selector).filter(visible=True)


def rows(tab: Any, table: str) -> Any:
    return tab.locator(f"#{table} tbody tr")


def test_iterations_page_filters_and_pages_on_the_server(
    dashboard: DashboardServer, page: Tab, data_dir: Path, held: list[Iterator[Any]]
) -> None:
    tab, recorder = page
    see = expect()
    flowers = write_dataset("flowers", data_dir / "flowers", 2, 10)
    birds = write_dataset("birds", data_dir / "birds", 1, 20)
    for index in range(11):
        finish(flowers, f"f-{index:02d}")
    hold(held, birds, "b-live")

    open_page(tab, f"{dashboard.url}iterations", "Iterations")
    see(tab.locator("#iterations-rows")).to_have_text("iterations 1-10 (more on the next page)")
    see(rows(tab, "iterations-table")).to_have_count(10)
    # newest first: the live one, with its dataset by name
    see(rows(tab, "iterations-table").first).to_contain_text("b-live")
    see(rows(tab, "iterations-table").first).to_contain_text("birds")
    see(tab.get_by_role("button", name="Newer")).to_be_disabled()
    screenshot(tab, "iterations")

    tab.get_by_role("button", name="Older").click()
    see(tab.locator("#iterations-rows")).to_have_text("iterations 11-12")
    see(rows(tab, "iterations-table")).to_have_count(2)
    see(rows(tab, "iterations-table").last).to_contain_text("f-00")
    see(tab.get_by_role("button", name="Older")).to_be_disabled()

    tab.get_by_role("button", name="running", exact=True).click()
    see(tab.locator("#iterations-rows")).to_have_text("iterations 1-1")
    see(rows(tab, "iterations-table")).to_have_count(1)
    see(rows(tab, "iterations-table").first).to_contain_text("b-live")

    tab.get_by_role("button", name="done", exact=True).click()
    see(tab.locator("#iterations-rows")).to_have_text("iterations 1-10 (more on the next page)")
    tab.get_by_label("dataset").select_option(label="birds")
    see(tab.locator("#iterations-table-empty")).to_have_text("No done iterations.")
    screenshot(tab, "iterations-filtered")

    # a link from elsewhere picks the dataset
    open_page(tab, f"{dashboard.url}iterations?dataset={flowers}", "Iterations")
    see(tab.get_by_label("dataset")).to_have_value("flowers")  # options show names
    see(tab.locator("#iterations-rows")).to_have_text("iterations 1-10 (more on the next page)")
    see(tab.locator("#iterations-table")).not_to_contain_text("b-live")
    assert recorder.foreign() == [] and recorder.errors == []


def test_delete_a_dataset_read_by_a_live_iteration_asks_then_forces(
    dashboard: DashboardServer, page: Tab, data_dir: Path, held: list[Iterator[Any]]
) -> None:
    tab, recorder = page
    see = expect()
    dataset_id = write_dataset("doomed", data_dir / "main", 2, 10)
    hold(held, dataset_id, "reader")

    open_page(tab, f"{dashboard.url}dataset?id={dataset_id}", "Dataset doomed")
    tab.get_by_role("button", name="Delete dataset…").click()
    confirm = tab.locator(".lf-confirm")
    see(confirm).to_contain_text(f"Delete dataset 'doomed' ({dataset_id})?")
    see(confirm).to_contain_text("Its 1 shardset (20 samples) and all its iterations")
    see(confirm).to_contain_text("Live now: reader (1 open stream)")
    tab.get_by_role("button", name="Cancel").click()
    see(confirm).to_be_hidden()

    tab.get_by_role("button", name="Delete dataset…").click()
    tab.get_by_role("button", name="Delete", exact=True).click()
    # the server's refusal, worded for the form, and the force choice
    busy = tab.locator(".lf-busy")
    see(busy).to_contain_text("reader")
    see(busy).to_contain_text("with the box below ticked")
    assert lavender.get_dataset(dataset_id).name == "doomed"  # nothing deleted yet
    force = tab.get_by_text(re.compile("^End the live iterations first")).filter(visible=True)
    see(force).to_be_visible()
    screenshot(tab, "delete-dataset-busy")

    tab.locator(".lf-force input").filter(visible=True).check()
    tab.get_by_role("button", name="End them and delete").click()
    see(shown(tab, ".lf-message")).to_have_text(
        f"Deleted dataset 'doomed' ({dataset_id}); its shard files stay."
    )
    see(tab.locator("#lf-back")).to_be_visible()
    see(tab.locator("#shardsets-table")).to_be_hidden()
    screenshot(tab, "dataset-deleted")
    assert "doomed" not in [d.name for d in lavender.list_datasets()]
    with pytest.raises(IterationNotFound):
        lavender.get_iteration("reader")
    assert (data_dir / "main").exists() and any((data_dir / "main").iterdir())
    assert recorder.foreign() == [] and recorder.errors == []


def test_delete_a_shardset_and_iterations(
    dashboard: DashboardServer, page: Tab, data_dir: Path
) -> None:
    tab, recorder = page
    see = expect()
    dataset_id = write_dataset("ds", data_dir / "main", 2, 10, feature=data_dir / "feat")
    feature = next(s for s in lavender.get_dataset(dataset_id).shardsets if not s.is_main)
    for name in ("old-1", "old-2", "old-3"):
        finish(dataset_id, name)

    open_page(
        tab, f"{dashboard.url}shardset?dataset={dataset_id}&id={feature.id}", re.compile("Shard")
    )
    see(tab.locator("#shardset-summary")).to_contain_text("dataset ds")  # by name
    tab.get_by_role("button", name="Delete shardset…").click()
    see(tab.locator(".lf-confirm")).to_contain_text(
        f"Delete shardset {feature.id} of dataset 'ds'?"
    )
    see(tab.locator(".lf-confirm")).to_contain_text("Its columns (score) leave the dataset.")
    see(tab.get_by_text(re.compile("^End the live iterations first"))).to_be_hidden()
    screenshot(tab, "delete-shardset-confirm")
    tab.get_by_role("button", name="Delete", exact=True).click()
    see(shown(tab, ".lf-message")).to_have_text(
        f"Deleted shardset {feature.id}; its shard files stay."
    )
    assert [s.id for s in lavender.get_dataset(dataset_id).shardsets] != [] and feature.id not in [
        s.id for s in lavender.get_dataset(dataset_id).shardsets
    ]

    # an iteration from its page: done, so Pushback is off
    open_page(tab, f"{dashboard.url}iteration?id=old-1", "Iteration old-1")
    see(tab.locator("#lf-state")).to_have_text("done")
    see(tab.get_by_role("button", name="Pushback")).to_be_disabled()
    see(tab.locator("#iteration-summary")).to_contain_text("dataset ds")
    tab.get_by_role("button", name="Delete iteration…").click()
    see(tab.locator(".lf-confirm")).to_contain_text("Delete iteration old-1?")
    see(tab.locator(".lf-confirm")).to_contain_text("Dataset 'ds' and its shard files stay.")
    tab.get_by_role("button", name="Delete", exact=True).click()
    see(tab.locator("#iteration-summary")).to_be_hidden()
    see(tab.locator("#lf-back")).to_be_visible()
    see(shown(tab, ".lf-message")).to_have_text("Deleted iteration old-1.")

    # two more from the dataset's table, selected
    open_page(tab, f"{dashboard.url}dataset?id={dataset_id}", "Dataset ds")
    see(rows(tab, "iterations-table")).to_have_count(2)
    tab.get_by_label("old-2").check()
    tab.get_by_label("old-3").check()
    tab.get_by_role("button", name="Delete selected iterations…").click()
    see(tab.locator(".lf-confirm")).to_contain_text("Delete 2 iterations: old-3, old-2?")
    tab.get_by_role("button", name="Delete", exact=True).click()
    see(tab.locator("#iterations-table-empty")).to_have_text("No iterations yet.")
    see(shown(tab, ".lf-message")).to_have_text("Deleted 2 iterations: old-3, old-2")
    screenshot(tab, "iterations-deleted")
    assert lavender.list_iterations(dataset_id) == []
    assert recorder.foreign() == [] and recorder.errors == []


@pytest.mark.parametrize(
    ("path", "title", "error"),
    [
        ("dataset?id=ds-nope", "Dataset ds-nope", r"^DatasetNotFound: .*ds-nope"),
        ("shardset?dataset=ds-nope&id=ss-nope", "Shardset ss-nope", r"^DatasetNotFound: "),
        ("iteration?id=nope", "Iteration nope", r"^IterationNotFound: "),
    ],
)
def test_a_bad_id_shows_one_line_and_a_way_back(
    dashboard: DashboardServer, page: Tab, client: LavenderClient, path: str, title: str, error: str
) -> None:
    tab, recorder = page
    see = expect()
    open_page(tab, f"{dashboard.url}{path}", title)
    alert = tab.locator(".lf-error")
    see(alert).to_have_count(1)
    see(alert).to_have_text(re.compile(error))
    assert "\n" not in alert.inner_text()
    see(tab.locator("#lf-back a")).to_be_visible()
    # nothing of the page's body under the error: no half-built layout
    for hidden in ("h3", "button", "table", "input", "textarea", "progress"):
        see(tab.locator(hidden).filter(visible=True)).to_have_count(0)
    screenshot(tab, f"error-{path.split('?')[0]}")
    assert "Traceback" not in tab.content()
    assert recorder.foreign() == [] and recorder.errors == []


@pytest.fixture
def keyed_dashboard(service: LavenderService) -> Iterator[DashboardServer]:
    """A server with two API keys and its dashboard, whose login takes either."""
    server = LavenderFlightServer(
        service,
        "grpc://127.0.0.1:0",
        middleware={"auth": ApiKeyMiddlewareFactory([KEY, OTHER_KEY])},
    )
    dashboard = serve_dashboard(
        f"grpc://127.0.0.1:{server.port}",
        0,
        api_key=KEY,
        login_keys=[KEY, OTHER_KEY],
        timeout=30.0,
    )
    yield dashboard
    dashboard.stop()
    server.shutdown()


def test_login_asks_for_an_api_key_and_takes_any_of_them(
    keyed_dashboard: DashboardServer, page: Tab
) -> None:
    tab, recorder = page
    see = expect()
    tab.goto(keyed_dashboard.url, wait_until="load", timeout=WAIT_MS)
    see(tab.locator("h1")).to_have_text("Lavender Flight")
    see(tab.locator("#lf-logo")).to_be_visible()
    see(tab.locator("form")).to_contain_text("API keys")
    see(tab.get_by_label("API key")).to_be_visible()
    screenshot(tab, "login")

    tab.get_by_label("API key").fill("not-a-key")
    tab.get_by_role("button", name="Log in").click()
    see(tab.locator("#login-error")).to_have_text(WRONG_KEY)
    screenshot(tab, "login-wrong-key")

    tab.get_by_label("API key").fill(OTHER_KEY)  # the second key works as well as the first
    tab.get_by_role("button", name="Log in").click()
    see(tab.locator("#lf-title")).to_have_text("Datasets")
    see(tab.locator("#lf-logout")).to_be_visible()
    tab.locator("#lf-logout").click()
    see(tab.locator("#logged-out")).to_have_text("You are logged out of the dashboard.")
    tab.goto(keyed_dashboard.url, wait_until="load", timeout=WAIT_MS)
    see(tab.get_by_label("API key")).to_be_visible()
    assert recorder.urls and recorder.foreign() == []


def test_nodes_page_and_the_node_serving_each_rank(
    dashboard: DashboardServer,
    page: Tab,
    server: LavenderFlightServer,
    data_dir: Path,
    held: list[Iterator[Any]],
) -> None:
    tab, recorder = page
    see = expect()
    dataset_id = write_dataset("ds", data_dir / "main", 2, 50)
    hold(held, dataset_id, "served")
    location = f"grpc://127.0.0.1:{server.port}"

    open_page(tab, f"{dashboard.url}nodes", "Nodes")
    # the page reads the nodes again while open: the held stream shows with the next beat
    see(tab.locator("#nodes-summary")).to_contain_text(
        "1 server on this catalog, 1 alive · 1 stream ·"
    )
    table = tab.locator("#nodes-table")
    see(table).to_contain_text(location)
    see(rows(tab, "nodes-table").first).to_contain_text("yes")
    see(table.locator("thead")).to_have_text(
        re.compile("location.*alive.*last heartbeat.*streams.*samples/s")
    )
    screenshot(tab, "nodes")

    open_page(tab, f"{dashboard.url}iteration?id=served", "Iteration served")
    see(tab.locator("#lf-epoch")).to_have_text("0")
    see(tab.locator("#lf-read-ahead")).to_be_visible()
    ranks = tab.locator("#ranks-table")
    see(ranks.locator("thead")).to_have_text(re.compile("rank.*epoch.*read ahead.*nodes"))
    see(rows(tab, "ranks-table")).to_have_count(1)
    see(rows(tab, "ranks-table").first).to_contain_text(location)
    screenshot(tab, "iteration-ranks")
    assert recorder.foreign() == [] and recorder.errors == []
