"""The dashboard in a real headless Chromium: pages render offline, forms work, pages go live.

Screenshots land in ``test-artifacts/panel_ui/``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.panel_ui import DashboardServer
from tests.panel_ui.conftest import (
    WAIT_MS,
    Recorder,
    screenshot,
    write_dataset,
    write_parquet,
    write_text_shard,
)

pytestmark = pytest.mark.browser

Tab = tuple[Any, Recorder]


def expect() -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect


def open_page(tab: Any, url: str, title: str) -> None:
    """Go to a page and wait until the server has rendered its title."""
    tab.goto(url, wait_until="load", timeout=WAIT_MS)
    expect()(tab.locator("#lf-title")).to_have_text(title, timeout=WAIT_MS)


def number(tab: Any, selector: str) -> int:
    return int(tab.locator(selector).inner_text(timeout=WAIT_MS))


def wait_for(check: Callable[[], bool], what: str, timeout: float = WAIT_MS / 1000) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen after {timeout}s")
        time.sleep(0.1)


def test_every_page_renders_offline(
    dashboard: DashboardServer, page: Tab, client: LavenderClient, data_dir: Path
) -> None:
    tab, recorder = page
    dataset_id = write_dataset("flowers", data_dir / "main", 2, 30, feature=data_dir / "feat")
    dataset = lavender.get_dataset(dataset_id)
    shardset = dataset.shardsets[0]
    stream = iter(Iteration.from_dataset(dataset_id, batch_size=10, iteration_id="epoch-1"))
    for _ in range(3):
        next(stream)
    url = dashboard.url
    see = expect()

    open_page(tab, url, "Datasets")
    see(tab.locator("#datasets-table")).to_contain_text("flowers")
    screenshot(tab, "datasets")

    open_page(tab, f"{url}dataset?id={dataset_id}", "Dataset flowers")
    see(tab.locator("#shardsets-table")).to_contain_text("uid: int64, text: string")
    see(tab.locator("#preview-rows")).to_have_text("rows 1-10 of 60")
    see(tab.locator("#preview-table tbody tr")).to_have_count(10)
    see(tab.locator("#iterations-table")).to_contain_text("epoch-1")
    tab.get_by_role("button", name="Next").click()
    see(tab.locator("#preview-rows")).to_have_text("rows 11-20 of 60")
    see(tab.locator("#preview-table tbody tr").first).to_contain_text("t10")
    tab.get_by_label("score").uncheck()  # the column picker
    see(tab.locator("#preview-table thead")).not_to_contain_text("score")
    see(tab.locator("#preview-table thead")).to_contain_text("text")
    screenshot(tab, "dataset")

    open_page(
        tab, f"{url}shardset?dataset={dataset_id}&id={shardset.id}", f"Shardset {shardset.id}"
    )
    see(tab.locator("#shards-table tbody tr")).to_have_count(2)
    see(tab.locator("#columns-table")).to_contain_text("a caption")
    screenshot(tab, "shardset")

    open_page(tab, f"{url}iteration?id=epoch-1", "Iteration epoch-1")
    see(tab.locator("#lf-completed")).to_have_text("20")
    see(tab.locator("#inflight-table")).to_be_visible()
    screenshot(tab, "iteration")

    open_page(tab, f"{url}plugins", "Plugins")
    see(tab.locator("#plugins-table, .lf-message").first).to_be_visible()
    screenshot(tab, "plugins")
    stream.close()

    assert recorder.urls, "no request recorded"
    assert recorder.foreign() == [], "requests that left this machine"
    assert recorder.errors == []


def test_create_a_dataset_and_a_shardset_through_the_forms(
    dashboard: DashboardServer, page: Tab, client: LavenderClient, data_dir: Path
) -> None:
    tab, recorder = page
    see = expect()
    open_page(tab, dashboard.url + "datasets", "Datasets")
    see(tab.locator("#datasets-table-empty")).to_be_visible()
    tab.get_by_placeholder("my-dataset").fill("photos")
    tab.get_by_role("button", name="Create dataset").click()
    see(tab.locator("#datasets-table")).to_contain_text("photos")
    see(tab.locator(".lf-message")).to_contain_text("Created dataset 'photos'")
    screenshot(tab, "dataset-created")

    tab.get_by_role("link", name="photos").click()
    see(tab.locator("#lf-title")).to_have_text("Dataset photos", timeout=WAIT_MS)
    location = data_dir / "captions"
    write_parquet(location / "part-0.parquet", range(0, 12))
    tab.get_by_placeholder("file:///data/my_shards").fill(location.as_uri())
    tab.get_by_role("button", name="Infer columns").click()
    columns = tab.locator("textarea")
    inferred = "uid: int64\ncaption: string\nwidth: int32"
    wait_for(
        lambda: columns.input_value() == inferred or tab.locator(".lf-error").count() > 0,
        "inferred columns or an error",
    )
    if columns.input_value() != inferred:  # the only assertion that needs the new action
        assert "infer_columns" in tab.locator(".lf-error").inner_text()
        pytest.skip("infer_columns action not on the server yet")
    see(tab.locator(".lf-message")).to_contain_text("Found 3 columns")
    columns.fill("uid: int64\ncaption: string  # what the photo shows\nwidth: int32")
    tab.get_by_role("button", name="Save shardset").click()
    see(tab.locator("#shardsets-table")).to_contain_text(
        "uid: int64, caption: string, width: int32"
    )
    see(tab.locator(".lf-message")).to_contain_text("1 shards, 12 samples")
    see(tab.locator("#preview-rows")).to_have_text("rows 1-10 of 12")
    see(tab.get_by_label("caption")).to_be_checked()
    see(tab.get_by_label("width")).to_be_checked()
    screenshot(tab, "shardset-created")
    shardset = lavender.get_dataset(name="photos").shardsets[0]
    assert [c.description for c in shardset.columns] == ["", "what the photo shows", ""]
    assert recorder.errors == []


def test_sync_shows_the_new_shards(
    dashboard: DashboardServer, page: Tab, client: LavenderClient, data_dir: Path
) -> None:
    tab, recorder = page
    see = expect()
    location = data_dir / "main"
    dataset_id = write_dataset("ds", location, shards=2, rows=10)
    shardset_id = lavender.get_dataset(dataset_id).shardsets[0].id
    open_page(
        tab, f"{dashboard.url}shardset?dataset={dataset_id}&id={shardset_id}", re.compile("Shard")
    )
    see(tab.locator("#shards-table tbody tr")).to_have_count(2)
    write_text_shard(location / "shard.00000002.parquet", range(20, 27))
    write_text_shard(location / "shard.00000003.parquet", range(27, 30))
    tab.get_by_role("button", name="Sync").click()
    see(tab.locator(".lf-message")).to_have_text(
        "Sync found 2 new shard files (shard.00000002.parquet, shard.00000003.parquet), "
        "0 changed, 0 removed: 4 shards, 30 samples"
    )
    see(tab.locator("#shards-table tbody tr")).to_have_count(4)
    see(tab.locator("#shards-table")).to_contain_text("shard.00000003.parquet")
    see(tab.locator("#shards-table")).to_contain_text("27 - 29")
    screenshot(tab, "shardset-synced")
    assert recorder.errors == []


class SlowTrainer(threading.Thread):
    """A training loop in the test process: a few batches with small sleeps, then it holds
    the batch it is on (the generator stays alive) until released."""

    def __init__(self, dataset_id: str, iteration_id: str, batches: int, pause: float) -> None:
        super().__init__(name="slow-trainer", daemon=True)
        self.iteration = Iteration.from_dataset(
            dataset_id, batch_size=20, iteration_id=iteration_id
        )
        assert self.iteration.id == iteration_id  # reading the id creates it on the server
        self.batches = batches
        self.pause = pause
        self.holding = threading.Event()
        self.release = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        stream = iter(self.iteration)
        try:
            for _ in range(self.batches):
                next(stream)
                time.sleep(self.pause)
            self.holding.set()
            self.release.wait(60)
        except BaseException as exc:
            self.failure = exc
        finally:
            self.holding.set()
            stream.close()


@pytest.mark.slow
def test_iteration_page_is_live_and_pushback_empties_the_flight(
    dashboard: DashboardServer, page: Tab, client: LavenderClient, data_dir: Path
) -> None:
    tab, recorder = page
    see = expect()
    dataset_id = write_dataset("ds", data_dir / "main", shards=4, rows=500)
    trainer = SlowTrainer(dataset_id, "live", batches=25, pause=0.15)
    open_page(tab, f"{dashboard.url}iteration?id=live", "Iteration live")
    see(tab.locator("#lf-completed")).to_have_text("0")
    see(tab.locator("#lf-state")).to_have_text("running")

    seen = [0]
    trainer.start()
    try:

        def grew() -> bool:
            value = number(tab, "#lf-completed")
            if value != seen[-1]:
                seen.append(value)
            return len(seen) >= 4

        wait_for(grew, "the completed bar growing while the trainer runs")
        assert seen == sorted(seen) and seen[-1] > 0
        assert trainer.holding.wait(30)
        assert trainer.failure is None
        see(tab.locator("#lf-completed")).to_have_text(str(24 * 20))  # the 25th is held
        assert number(tab, "#lf-inflight") > 0
        see(tab.locator("#inflight-table tbody tr")).to_have_count(1)
        value = tab.locator(".lf-bar-completed progress").get_attribute("value")
        assert value == str(24 * 20)
        screenshot(tab, "iteration-running")

        tab.get_by_role("button", name="Pushback").click()
        see(tab.locator(".lf-message")).to_contain_text("in-flight samples: they return")
        see(tab.locator("#lf-inflight")).to_have_text("0")
        see(tab.locator("#inflight-table-empty")).to_have_text("Nothing in flight.")
        see(tab.locator("#lf-completed")).to_have_text(str(24 * 20))
        screenshot(tab, "iteration-pushed-back")
    finally:
        trainer.release.set()
        trainer.join(30)
    assert not trainer.is_alive() and trainer.failure is None
    rank = lavender.get_iteration("live").ranks[0]
    # the loop's batch was completed on closing; what it had not reached is queued again
    # (or held by the stream that was still open, ahead of the loop, until it closed)
    assert rank.inflight == 0 and rank.pending + rank.read_ahead > 0
    assert recorder.errors == []


def test_errors_show_as_one_line_messages(
    dashboard: DashboardServer, page: Tab, client: LavenderClient
) -> None:
    tab, recorder = page
    see = expect()
    open_page(tab, f"{dashboard.url}dataset?id=ds-nope", "Dataset ds-nope")
    see(tab.locator(".lf-error")).to_have_text(re.compile(r"^DatasetNotFound: .*ds-nope"))
    open_page(tab, f"{dashboard.url}iteration?id=nope", "Iteration nope")
    see(tab.locator(".lf-error")).to_have_text(re.compile(r"^IterationNotFound: "))

    lavender.create_dataset("taken")
    open_page(tab, f"{dashboard.url}datasets", "Datasets")
    tab.get_by_placeholder("my-dataset").fill("taken")
    tab.get_by_role("button", name="Create dataset").click()
    see(tab.locator(".lf-error")).to_have_text(
        "DatasetAlreadyExists: a dataset named 'taken' exists already"
    )
    screenshot(tab, "error")
    assert "Traceback" not in tab.content()
    assert recorder.errors == []
