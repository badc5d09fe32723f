"""A mixture on the iteration page: its sources this epoch and its weights over time, read
from a real server (without a browser, then in Chromium)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from lavender_flight.client import Iteration, MixtureSource
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.panel_ui import DashboardServer, IterationPage
from tests.panel_ui.conftest import Recorder, screenshot, write_dataset
from tests.panel_ui.test_browser import expect, open_page


def mixed_run(data_dir: Path, iteration_id: str) -> int:
    """Two sources 0.9/0.1, reweighted to 0.2/0.8 after the first batch, run to the end.

    Returns the sample where the new weights took effect.
    """
    big = write_dataset("big-source", data_dir / "big", 2, 40)
    small = write_dataset("small-source", data_dir / "small", 1, 30)
    batches = iter(
        Iteration.from_mixture(
            [MixtureSource(big, 0.9), MixtureSource(small, 0.1)],
            batch_size=10,
            shuffle_seed=3,
            on_exhausted="rebalance",
            iteration_id=iteration_id,
        )
    )
    next(batches)
    changed = lavender.set_mixture_weights(iteration_id, {big: 0.2, small: 0.8})
    for batch in batches:
        del batch
    return changed.from_seq


def test_a_mixture_shows_its_sources_and_its_weights_over_time(
    client: LavenderClient, data_dir: Path
) -> None:
    from_seq = mixed_run(data_dir, "mixed")
    page = IterationPage(client=client, iteration_id="mixed")
    page.__panel__()
    assert page.progress is not None and page.progress.done
    sources = page.sources
    assert sources is not None
    # rebalance: every sample of every source once, sources named by their datasets
    assert sources.to_dict("records") == [
        {"source": "big-source", "weight": "0.2 (20%)", "size": 80, "drawn": 80,
         "finished": 80, "passes": 1, "exhausted": "yes"},
        {"source": "small-source", "weight": "0.8 (80%)", "size": 30, "drawn": 30,
         "finished": 30, "passes": 1, "exhausted": "yes"},
    ]  # fmt: skip
    schedule = page.schedule
    assert schedule is not None
    assert list(schedule.columns) == ["epoch", "from sample", "set at", "big-source",
                                      "small-source"]  # fmt: skip
    assert schedule[["epoch", "from sample", "big-source", "small-source"]].to_dict(
        "records"
    ) == [
        {"epoch": 0, "from sample": 0, "big-source": "0.9 (90%)", "small-source": "0.1 (10%)"},
        {"epoch": 0, "from sample": from_seq, "big-source": "0.2 (20%)",
         "small-source": "0.8 (80%)"},
    ]  # fmt: skip
    assert 10 <= from_seq < 110  # past the first batch, within the epoch
    assert "a mixture of 2 datasets" in page._summary.object
    html = page._mixture.object
    assert "when a source runs out: <b>rebalance</b>" in html
    assert 'id="sources-table"' in html and 'id="schedule-table"' in html

    plain = write_dataset("plain", data_dir / "plain", 1, 10)
    for batch in Iteration.from_dataset(plain, batch_size=10, iteration_id="plain"):
        del batch
    other = IterationPage(client=client, iteration_id="plain")
    other.__panel__()
    assert other.sources is None and other._mixture.object == ""  # no mixture, no section


@pytest.mark.browser
def test_the_mixture_section_in_chromium(
    dashboard: DashboardServer, page: tuple[Any, Recorder], data_dir: Path
) -> None:
    tab, recorder = page
    see = expect()
    from_seq = mixed_run(data_dir, "mixed-seen")
    open_page(tab, f"{dashboard.url}iteration?id=mixed-seen", "Iteration mixed-seen")
    see(tab.locator("#sources-table thead")).to_have_text(
        re.compile("source.*weight.*size.*drawn.*finished.*passes.*exhausted")
    )
    see(tab.locator("#sources-table tbody tr")).to_have_count(2)
    see(tab.locator("#sources-table tbody tr").first).to_contain_text("big-source")
    rows = tab.locator("#schedule-table tbody tr")
    see(rows).to_have_count(2)
    see(rows.nth(1)).to_contain_text(str(from_seq))
    see(rows.nth(1)).to_contain_text("0.8 (80%)")
    screenshot(tab, "iteration-mixture")
    assert recorder.foreign() == [] and recorder.errors == []
