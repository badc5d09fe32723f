"""Importing the client loads the contract and nothing of the server side (a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

LOADED = """
import json, sys
import lavender_flight.client
from lavender_flight.client import api
print(json.dumps(sorted(sys.modules)))
"""


def test_the_client_loads_no_server_catalog_transforms_or_adbc() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LOADED], capture_output=True, text=True, timeout=120, check=True
    )
    modules = json.loads(done.stdout)
    ours = sorted({m.split(".")[1] for m in modules if m.startswith("lavender_flight.")})
    assert ours == ["client", "protocol"]
    heavy = [
        m
        for m in modules
        if m.split(".")[0]
        in (
            "adbc_driver_manager",
            "adbc_driver_sqlite",
            "adbc_driver_postgresql",
            "fsspec",
            "s3fs",
            "panel",
            "bokeh",
        )
    ]
    assert heavy == []
