"""Fixtures of the server's tests: a real web server on loopback, for http(s) locations."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest

from tests.conftest import CALL_TIMEOUT


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a folder (listings included) without logging every request."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class Web:
    """A web server on loopback serving ``root``."""

    root: Path
    port: int

    def url(self, folder: str, credentials: str = "") -> str:
        """The URL of a folder, with ``user:password@`` when ``credentials`` are given."""
        at = f"{credentials}@" if credentials else ""
        return f"http://{at}127.0.0.1:{self.port}/{folder}"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    """A web server serving ``tmp_path/www``: one CSV shard (uids 1, 2) under ``shards/``."""
    root = tmp_path / "www"
    (root / "shards").mkdir(parents=True)
    pa_csv.write_csv(pa.table({"uid": [1, 2], "text": ["a", "b"]}), root / "shards" / "a.csv")
    handler = functools.partial(QuietFiles, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Web(root, server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(CALL_TIMEOUT)
