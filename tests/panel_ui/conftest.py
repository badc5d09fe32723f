"""Dashboard fixtures: datasets written through the client, the dashboard, a real Chromium."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lavender_flight.client import Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.panel_ui import DashboardServer, serve_dashboard

CHROMIUM = os.environ.get("LAVENDER_FLIGHT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(
    os.environ.get("LAVENDER_FLIGHT_SHOTS")
    or Path(__file__).resolve().parents[2] / "test-artifacts" / "panel_ui"
)
"""Where screenshots go (``LAVENDER_FLIGHT_SHOTS`` to look at them elsewhere)."""
WAIT_MS = 15_000
"""Every browser wait gives up after this long (milliseconds)."""

LOCAL_URL = re.compile(r"^(https?|wss?)://127\.0\.0\.1:\d+/|^(blob|data|about):")
"""Where a page may send requests: this machine's dashboard only (no CDN, no fonts)."""


def write_dataset(
    name: str, location: Path, shards: int, rows: int, feature: Path | None = None
) -> str:
    """A dataset of ``shards`` parquet shards, uids 0.. in order, text ``t<uid>``.

    With ``feature``, a second shardset there adds ``score = uid / 10``.
    """
    dataset = lavender.create_dataset(name=name)
    main = lavender.create_shardset(
        dataset.id,
        location.as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="text", type_="str", description="a caption"),
        ],
    )
    writer = Writer.get(dataset_id=dataset.id, shardset_id=main.id)
    for index in range(shards):
        first = index * rows
        writer.write(
            [{"uid": u, "text": f"t{u}"} for u in range(first, first + rows)], shard_index=index
        )
    if feature is not None:
        extra = lavender.create_shardset(
            dataset.id,
            feature.as_uri(),
            [
                lavender.DatasetColumnOptions(name="uid", type_="int"),
                lavender.DatasetColumnOptions(name="score", type_="float64"),
            ],
        )
        Writer.get(dataset_id=dataset.id, shardset_id=extra.id).write(
            [{"uid": u, "score": u / 10} for u in range(shards * rows)]
        )
    return dataset.id


def write_parquet(path: Path, uids: range) -> None:
    """A shard file put at a location by other means than the client (for infer and sync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "uid": pa.array(list(uids), pa.int64()),
                "caption": [f"c{u}" for u in uids],
                "width": pa.array([u % 7 for u in uids], pa.int32()),
            }
        ),
        path,
    )


def write_text_shard(path: Path, uids: range) -> None:
    """A shard file with the columns of :func:`write_dataset`'s main shardset."""
    pq.write_table(pa.table({"uid": list(uids), "text": [f"t{u}" for u in uids]}), path)


@pytest.fixture
def dashboard(api_url: str, client: LavenderClient) -> Iterator[DashboardServer]:
    """The dashboard of the test server, on a port the system picked."""
    served = serve_dashboard(api_url, port=0, timeout=30.0)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (never a downloaded browser)."""
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]' (never `playwright install`)")
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (see .ci/run)")
    sync_api.expect.set_options(timeout=WAIT_MS)
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000
        )
        yield launched
        launched.close()


class Recorder:
    """The requests and console errors of one browser page."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.errors: list[str] = []

    def foreign(self) -> list[str]:
        """Requests that went anywhere but this machine's dashboard."""
        return [u for u in self.urls if not LOCAL_URL.match(u)]


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Any, Recorder]]:
    """A fresh browser page, with its requests and console errors recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    tab = context.new_page()
    recorder = Recorder()
    tab.on("request", lambda request: recorder.urls.append(request.url))
    tab.on(
        "console",
        lambda message: recorder.errors.append(message.text) if message.type == "error" else None,
    )
    tab.on("pageerror", lambda exc: recorder.errors.append(str(exc)))
    yield tab, recorder
    context.close()


def screenshot(tab: Any, name: str) -> Path:
    """Save the whole page as ``<ARTIFACTS>/<name>.png``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    tab.screenshot(path=str(path), full_page=True, timeout=WAIT_MS)
    return path
