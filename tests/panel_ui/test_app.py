"""Serving the dashboard: in-process with ``stop()``, and ``lavender-flight ui`` as a process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lavender_flight.client.connection import LavenderClient
from lavender_flight.panel_ui import DashboardServer, main, serve_dashboard
from tests.panel_ui.conftest import write_dataset

HTTP_TIMEOUT = 30.0
START_TIMEOUT = 60.0


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as answer:
        assert answer.status == 200
        return str(answer.read().decode())


def test_every_route_answers(dashboard: DashboardServer, data_dir: Path) -> None:
    dataset_id = write_dataset("ds", data_dir / "main", shards=1, rows=5)
    assert dashboard.port > 0 and dashboard.url == f"http://127.0.0.1:{dashboard.port}/"
    titles = {
        "": "Datasets",
        "datasets": "Datasets",
        f"dataset?id={dataset_id}": "Dataset",
        "dataset?id=nope": "Dataset",
        "shardset?dataset=x&id=y": "Shardset",
        "iteration?id=nope": "Iteration",
        "plugins": "Plugins",
    }
    for path, title in titles.items():
        page = fetch(dashboard.url + path)
        assert f"<title>Lavender Flight · {title}</title>" in page, path
        assert "cdn.bokeh.org" not in page and "cdn.holoviz.org" not in page
        assert "fonts.googleapis" not in page


def test_stop_closes_the_port(api_url: str) -> None:
    served = serve_dashboard(api_url, port=0)
    url = served.url
    fetch(url + "plugins")
    served.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5.0)
    served.stop()  # twice is fine


def test_a_taken_port_fails_with_a_message(
    dashboard: DashboardServer, api_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(OSError):
        serve_dashboard(api_url, port=dashboard.port)
    code = main(["--api-url", api_url, "--port", str(dashboard.port)])
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(
        f"lavender-flight ui: error: cannot serve on 127.0.0.1:{dashboard.port}: OSError: "
    )
    assert "\n" not in error


def test_ui_command_refuses_an_http_url_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--api-url", "http://localhost:8000", "--port", "0"]) == 2
    assert capsys.readouterr().err == (
        "lavender-flight ui: error: InvalidArgument: api_url 'http://localhost:8000' is an HTTP "
        "address, but a Lavender Flight server speaks Arrow Flight (gRPC): use "
        "grpc://localhost:8815 (grpc+tls://localhost:8815 for a server with TLS)\n"
    )


def test_ui_command_serves_until_sigterm(api_url: str, client: LavenderClient) -> None:
    code = "import sys; from lavender_flight.panel_ui import main; sys.exit(main())"
    with subprocess.Popen(
        [sys.executable, "-c", code, "--api-url", api_url, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        watch_ui_command(process, api_url)


def watch_ui_command(process: subprocess.Popen[str], api_url: str) -> None:
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + START_TIMEOUT
        line = ""
        while time.monotonic() < deadline and "dashboard" not in line:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
        found = re.search(r"dashboard (http://127\.0\.0\.1:\d+/) \(data from (\S+)\)", line)
        assert found, f"no address announced: {line!r}"
        assert found.group(2) == api_url
        assert "<title>Lavender Flight · Datasets</title>" in fetch(found.group(1) + "datasets")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HTTP_TIMEOUT) == 0
        assert "shutting down" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=HTTP_TIMEOUT)
