"""The error table of ``tests/flight_server/test_wire_errors.py`` from a Node.js gRPC client:
the gRPC status code, and a message and trailers that are one line of ours, with no
traceback, no server path and no source line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.any_language.test_node_client import NODE_DIR, node  # noqa: F401  (a fixture)
from tests.flight_server.test_wire_errors import (  # noqa: F401  (wire_world is a fixture)
    BUG_MESSAGE,
    CASES,
    WireWorld,
    leaks,
    wire_world,
)

pytestmark = pytest.mark.node


def call_raw(node: str, url: str, calls: list[dict[str, Any]], folder: Path) -> list[Any]:  # noqa: F811
    """Run ``call_raw.mjs``: what came back for each call (code, details, trailers)."""
    spec = folder / "calls.json"
    spec.write_text(json.dumps(calls))
    done = subprocess.run(
        [node, str(NODE_DIR / "call_raw.mjs"), url, str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answers: list[Any] = json.loads(done.stdout)
    assert len(answers) == len(calls)
    return answers


def test_node_gets_the_status_and_one_clean_line_for_every_bad_call(
    node: str,  # noqa: F811
    wire_world: WireWorld,  # noqa: F811
    tmp_path: Path,
) -> None:
    calls = [case.call(wire_world).as_json() for case in CASES]
    answers = call_raw(node, wire_world.url, calls, tmp_path)
    wrong = []
    for case, answer in zip(CASES, answers, strict=True):
        if answer.get("code") != case.status:
            wrong.append(f"{case.description}: {answer}")
            continue
        details = answer["details"]
        line = details.split(". Detail: ", 1)[0]
        if not line.startswith(f"{case.cls.__name__}: "):
            wrong.append(f"{case.description}: details {details!r}")
        texts = {"details": details, **answer["metadata"]}
        for key, text in texts.items():
            if leaks(text) or BUG_MESSAGE in text:
                wrong.append(f"{case.description}: {key} leaks {leaks(text)}: {text!r}")
        # Arrow's own trailer holds the message alone: the very line of ours
        if answer["metadata"].get("x-arrow-status-message-bin") != line:
            wrong.append(f"{case.description}: message trailer {answer['metadata']}")
    assert not wrong, "\n".join(wrong)
