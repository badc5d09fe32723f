"""The README runs verbatim: its walk-through, as one script, against a server started as it
says (twice in a row: a rerun must not trip on what the first run left), and its two
commands are the ones CI runs; the examples of the mixture, elastic, category and single
sample sections print what they say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flight_server.test_cli import (  # noqa: F401  (launch is a fixture)
    Launcher,
    clean_env,
    launch,
    lavender_flight_command,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SERVING = re.compile(r"^Lavender Flight serving (grpc://[\w.\-]+:\d+)\s*$")
README_URL = "grpc://127.0.0.1:8815"
"""The address the walk-through gives ``lavender.init`` (the server's default port)."""
RUN_TIMEOUT = 300


def readme_commands() -> list[str]:
    """The commands of the README's first shell block (install and demo; install and test)."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)
    assert block, "the README opens without its commands"
    return [ln for ln in block.group(1).splitlines() if ln and not ln.startswith("#")]


def walk_through() -> list[str]:
    """The Python blocks from the walk-through on, those marked as not run aside."""
    text = README.read_text()
    start = text.index("## Walk-through")
    blocks = re.findall(r"```python\n(.*?)```", text[start:], re.DOTALL)
    return [
        block
        for block in blocks
        if not block.startswith("# (not run") and not block.startswith("# modules/")
    ]


SECTIONS = [
    "### Mixtures: several datasets drawn by weight",
    "### Live mixture weights",
    "### Elastic resume: another number of ranks",
    "### Batches of one category",
    "### Single samples",
]
"""Sections of the walk-through whose one example prints what the test checks."""


def section_blocks(heading: str) -> list[str]:
    """The Python blocks of one section of the walk-through."""
    text = README.read_text()
    start = text.index("\n" + heading + "\n")
    end = text.find("\n### ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end >= 0 else None], re.DOTALL)


def test_each_checked_section_has_one_example_in_the_walk_through() -> None:
    run = walk_through()
    for heading in SECTIONS:
        blocks = section_blocks(heading)
        assert len(blocks) == 1, heading
        assert blocks[0] in run, f"{heading}: its example is not run"


def check_printed(stdout: str) -> None:
    """What the examples of ``SECTIONS`` print (the script prints other lines too)."""
    lines = stdout.splitlines()
    # elastic resume: 10 batches of 10 dealt to 2 ranks, each completed 2: 60 left, 1 rank
    assert "60 1" in lines, stdout
    # single samples: the first, a dict with the feature column joined
    assert "{'uid': 0, 'text': 'Sample 0', 'length': 8}" in lines, stdout
    # one length bucket per batch: 'Sample 0'..'Sample 9' are 8 chars, the rest 9 or more
    buckets = [line for line in lines if re.fullmatch(r"\[[\d, ]+\]", line)]
    assert set(buckets) == {"[8]", "[9]"}, buckets
    # live weights: the schedule, the spec's weights first, then the change
    schedule = [line for line in lines if re.match(r"^\d+ \d+ \{'", line)]
    assert len(schedule) == 2 and schedule[0].startswith("0 0 "), schedule
    assert ": 0.9, " in schedule[0] and schedule[0].endswith(": 0.1}"), schedule
    assert ": 0.2, " in schedule[1] and schedule[1].endswith(": 0.8}"), schedule


def test_ci_runs_the_readme_test_command() -> None:
    install_and_demo, install_and_test = readme_commands()
    assert install_and_demo.endswith("lavender-flight serve --demo")
    assert "torch" not in install_and_demo  # the server and the client need no torch
    assert install_and_test.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == install_and_test
    assert any(line.startswith("python3 -m venv") for line in ci)  # a fresh venv


@pytest.mark.slow
def test_the_walk_through_runs_verbatim_twice(launch: Launcher, tmp_path: Path) -> None:  # noqa: F811
    blocks = walk_through()
    assert len(blocks) >= 10, "the walk-through lost its blocks"
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = clean_env(HOME=str(home))  # the server's data home: ~/.lavender-flight
    # started as the README says, on a free port and without the dashboard's fixed one
    served = launch([*lavender_flight_command(), "serve", "--port", "0", "--ui-port", "0"],
                    env=env, cwd=work)  # fmt: skip
    url = served.wait_for(SERVING).group(1)
    script = tmp_path / "walk_through.py"
    script.write_text("\n\n".join(b.replace(README_URL, url) for b in blocks))
    for attempt in (1, 2):
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, f"run {attempt}:\n{done.stdout}\n{done.stderr}"
        assert "is the last epoch iterated" in done.stdout
        check_printed(done.stdout)
    assert served.stop() == 0
