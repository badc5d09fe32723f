"""The README's walk-through runs as written: its python blocks, in order, against a real server.

Two things are swapped for the test's: the server's URL (``grpc://127.0.0.1:8815``) and the
data folder (``file:///data/lavender``). Every block of the walk-through up to the last
section checked here runs, so each block depends only on the ones before it.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from lavender_flight.client.connection import LavenderClient

ROOT = Path(__file__).resolve().parents[1]
FIRST = "## Walk-through"
LAST = "### Single samples"
CHECKED = [
    "### Mixtures: several datasets drawn by weight",
    "### Live mixture weights",
    "### Elastic resume: another number of ranks",
    "### Batches of one category",
    LAST,
]


def walk_through() -> list[tuple[str, str]]:
    """``(heading, code)`` of every python block from the walk-through to ``LAST``'s."""
    text = (ROOT / "README.md").read_text()
    start = text.index(FIRST)
    end = text.index("\n### ", text.index(LAST) + 1)
    blocks: list[tuple[str, str]] = []
    heading = FIRST
    for part in re.split(r"(^#{2,3} .*$)", text[start:end], flags=re.M):
        if re.match(r"^#{2,3} ", part):
            heading = part.strip()
            continue
        blocks += [(heading, code) for code in re.findall(r"```python\n(.*?)```", part, re.S)]
    return blocks


def test_every_checked_section_has_one_runnable_example() -> None:
    headings = [heading for heading, _ in walk_through()]
    for section in CHECKED:
        assert headings.count(section) == 1, section


def test_the_walk_through_runs(
    client: LavenderClient, api_url: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(data_dir)
    namespace: dict[str, object] = {"__name__": "readme"}
    printed: dict[str, str] = {}
    for heading, code in walk_through():
        code = code.replace("grpc://127.0.0.1:8815", api_url)
        code = code.replace("file:///data/lavender", data_dir.as_uri())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                exec(compile(code, f"README.md {heading}", "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"the block of {heading!r} fails: {type(exc).__name__}: {exc}")
        printed[heading] = printed.get(heading, "") + out.getvalue()
    assert "60 1" in printed["### Elastic resume: another number of ranks"]
    single = printed[LAST]
    assert "{'uid': 0, 'text': 'Sample 0', 'length': 8}" in single
    lengths = printed["### Batches of one category"].split("\n")
    assert {line for line in lengths if line} <= {"[8]", "[9]"}
    schedule = printed["### Live mixture weights"].strip().splitlines()[1:]
    assert len(schedule) == 2 and schedule[0].startswith("0 0 ")
