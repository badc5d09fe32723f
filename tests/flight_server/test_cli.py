"""The command line as a user runs it: real subprocesses, port 0, a temporary data home."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from lavender_flight.flight_server.settings import ServerSettings

pytestmark = pytest.mark.slow

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
BANNER = re.compile(r"^Lavender Flight serving (grpc://[\w.\-]+:(\d+))\s*$")
UI_LINE = re.compile(r"^\s+ui\s", re.MULTILINE)


def lavender_flight_command() -> list[str]:
    """The installed ``lavender-flight`` script of this Python (not a pyenv shim if avoidable)."""
    beside = Path(sys.executable).with_name("lavender-flight")
    found = str(beside) if beside.exists() else shutil.which("lavender-flight")
    assert found, "the lavender-flight script is not installed"
    return [found]


PYTHON_M = [sys.executable, "-m", "lavender_flight.flight_server"]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any LAVENDER_FLIGHT_* setting of the developer, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAVENDER_FLIGHT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Served:
    """A server process and what it has said on stderr so far."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _ended: bool = False
    url: str = ""

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def start_reading(self) -> None:
        threading.Thread(target=self._drain, daemon=True).start()

    def wait_for(self, pattern: re.Pattern[str], timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Read stderr lines until one matches ``pattern``; fail with all of stderr if none does."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self._ended = True
                self.process.wait(timeout=STOP_TIMEOUT)
                pytest.fail(
                    f"the server exited ({self.process.returncode}) before printing "
                    f"{pattern.pattern!r}:\n" + self.stderr
                )
            self.lines.append(line)
            if match := pattern.search(line):
                return match
        pytest.fail(f"no {pattern.pattern!r} on stderr within {timeout}s:\n" + self.stderr)

    def wait_until_serving(self) -> str:
        self.url = self.wait_for(BANNER).group(1)
        return self.url

    def rest_of_stderr(self) -> str:
        """After the process ended: every line it printed."""
        while not self._ended:
            line = self._queue.get(timeout=STOP_TIMEOUT)
            if line is None:
                self._ended = True
            else:
                self.lines.append(line)
        return self.stderr

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and return the exit code (fails if it takes longer than STOP_TIMEOUT)."""
        self.process.send_signal(sig)
        return self.process.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        """Terminate the process if it still runs (kill it if it lingers); close its pipe."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        if self.process.stderr is not None:
            self.process.stderr.close()


class Launcher(Protocol):
    def __call__(
        self, args: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Served: ...


@pytest.fixture
def launch() -> Iterator[Launcher]:
    """Start server processes; whatever is still running at teardown is terminated, then killed."""
    started: list[Served] = []

    def start(
        args: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Served:
        process = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env if env is not None else clean_env(),
            cwd=cwd,
        )
        served = Served(process)
        started.append(served)
        served.start_reading()
        return served

    yield start
    for served in started:
        served.close()


@pytest.fixture
def connect(reset_client: None) -> None:
    """Reset the module-level client after a test that used ``lavender.init``."""


def check_demo(url: str) -> str:
    """What a new user checks against ``--demo``; returns the demo dataset's id."""
    lavender.init(url, timeout=10)
    names = [d.name for d in lavender.list_datasets()]
    assert names == ["demo"]
    demo = lavender.get_dataset(name="demo")
    assert len(demo.shardsets) == 2
    assert 1000 <= demo.total_samples <= 20_000
    assert all(s.total_samples == demo.total_samples for s in demo.shardsets)
    preview = lavender.preview_dataset(demo.id, limit=25)
    assert preview.num_rows == 25
    assert {"uid", "text", "label", "length", "score"} <= set(preview.column_names)
    nulls = {name: preview.column(name).null_count for name in preview.column_names}
    assert not any(nulls.values()), f"joined columns hold nulls: {nulls}"
    assert preview.column("uid").to_pylist() == list(range(25))
    return demo.id


def stop_cleanly(served: Served) -> None:
    started = time.monotonic()
    code = served.stop(signal.SIGTERM)
    elapsed = time.monotonic() - started
    assert code == 0, served.rest_of_stderr()
    assert elapsed < 5.0, f"SIGTERM took {elapsed:.1f}s"
    assert "Lavender Flight shutting down" in served.rest_of_stderr()


# -- serve --------------------------------------------------------------------------------


def test_serve_demo_comes_up_and_stops_on_sigterm(
    launch: Launcher, connect: None, tmp_path: Path
) -> None:
    served = launch(
        [*lavender_flight_command(), "serve", "--demo", "--no-ui", "--port", "0",
         "--data-home", str(tmp_path)]
    )  # fmt: skip
    url = served.wait_until_serving()
    assert not url.endswith(":0")
    check_demo(url)
    assert (tmp_path / "catalog.db").is_file()
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["features", "main"]
    stop_cleanly(served)
    assert not UI_LINE.search(served.stderr), "--no-ui still announced the dashboard"


def test_demo_is_created_once_per_data_home(
    launch: Launcher, connect: None, tmp_path: Path
) -> None:
    args = [
        *lavender_flight_command(),
        "--demo",
        "--no-ui",
        "--port",
        "0",
        "--data-home",
        str(tmp_path),
    ]
    first = launch(args)
    first_id = check_demo(first.wait_until_serving())
    stop_cleanly(first)

    second = launch(args)
    second_id = check_demo(second.wait_until_serving())
    assert second_id == first_id
    second.wait_for(re.compile(r"^  catalog  .* \(1 datasets, 5000 samples\)$"), timeout=5)
    stop_cleanly(second)


@pytest.mark.parametrize("words", [["serve"], []], ids=["serve", "no-serve-word"])
def test_python_dash_m_works_the_same(
    launch: Launcher, connect: None, tmp_path: Path, words: list[str]
) -> None:
    served = launch(
        [*PYTHON_M, *words, "--demo", "--no-ui", "--port", "0", "--data-home", str(tmp_path)]
    )
    check_demo(served.wait_until_serving())
    stop_cleanly(served)


def test_sigint_stops_it_too(launch: Launcher, tmp_path: Path) -> None:
    served = launch([*PYTHON_M, "--no-ui", "--port", "0", "--data-home", str(tmp_path)])
    served.wait_until_serving()
    assert served.stop(signal.SIGINT) == 0, served.rest_of_stderr()


def test_flags_come_from_the_environment(launch: Launcher, connect: None, tmp_path: Path) -> None:
    home = tmp_path / "home"
    catalog = tmp_path / "elsewhere" / "my-catalog.db"
    env = clean_env(
        LAVENDER_FLIGHT_PORT="0",
        LAVENDER_FLIGHT_DATA_HOME=str(home),
        LAVENDER_FLIGHT_DEMO="true",
        LAVENDER_FLIGHT_NO_UI="1",
        LAVENDER_FLIGHT_CATALOG=str(catalog),
        # a client setting in the same shell must not upset the server's settings
        LAVENDER_FLIGHT_API_URL="grpc://127.0.0.1:1",
    )
    served = launch(lavender_flight_command(), env=env)
    url = served.wait_until_serving()
    assert int(url.rsplit(":", 1)[1]) not in (0, 8815)
    check_demo(url)
    assert catalog.is_file()
    assert not (home / "catalog.db").exists()
    assert (home / "demo" / "main").is_dir()
    served.wait_for(re.compile(re.escape(f"catalog  {catalog}")), timeout=5)
    stop_cleanly(served)
    assert not UI_LINE.search(served.stderr), "LAVENDER_FLIGHT_NO_UI=1 still announced the UI"


def test_flag_wins_over_environment(launch: Launcher, tmp_path: Path) -> None:
    env = clean_env(LAVENDER_FLIGHT_PORT="1", LAVENDER_FLIGHT_DATA_HOME=str(tmp_path / "env"))
    served = launch(
        [
            *lavender_flight_command(),
            "--port",
            "0",
            "--no-ui",
            "--data-home",
            str(tmp_path / "flag"),
        ],
        env=env,
    )
    assert not served.wait_until_serving().endswith(":1")
    assert (tmp_path / "flag" / "catalog.db").is_file()
    assert not (tmp_path / "env").exists()
    stop_cleanly(served)


# -- help ---------------------------------------------------------------------------------


def run_quickly(
    args: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env=env if env is not None else clean_env(COLUMNS="200"),
        check=False,
    )


@pytest.mark.parametrize("command", [lavender_flight_command(), PYTHON_M], ids=["script", "-m"])
def test_serve_help_lists_every_flag_with_its_env_variable(command: list[str]) -> None:
    done = run_quickly([*command, "serve", "--help"])
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for name in ServerSettings.model_fields:
        flag = "--" + name.replace("_", "-")
        env = "LAVENDER_FLIGHT_" + name.upper()
        assert re.search(rf"{flag}\b", text), f"{flag} missing from --help"
        assert re.search(rf"\[env {env}[;\]]", text), f"{env} missing from --help"
    assert "PydanticUndefined" not in text
    assert "[env LAVENDER_FLIGHT_API_KEY]" in text  # a list: no default to show
    assert "[env LAVENDER_FLIGHT_PORT; default 8815]" in text


def test_top_level_help_names_the_serve_command() -> None:
    done = run_quickly([*lavender_flight_command(), "--help"])
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout
    assert "Arrow Flight" in done.stdout


def test_bad_flag_is_a_usage_error() -> None:
    done = run_quickly([*lavender_flight_command(), "serve", "--prot", "0"])
    assert done.returncode == 2
    assert "unrecognized arguments: --prot" in done.stderr
    assert done.stderr == (
        "lavender-flight: error: unrecognized arguments: --prot 0 (did you mean --port?); "
        "see lavender-flight serve --help\n"
    )


# -- known bugs ---------------------------------------------------------------------------


def test_demo_with_a_relative_data_home(launch: Launcher, connect: None, tmp_path: Path) -> None:
    served = launch(
        [*lavender_flight_command(), "--demo", "--no-ui", "--port", "0", "--data-home", "rel"],
        cwd=tmp_path,
    )
    check_demo(served.wait_until_serving())
    stop_cleanly(served)


def test_a_failed_demo_creation_is_redone_next_time(
    launch: Launcher, connect: None, tmp_path: Path
) -> None:
    (tmp_path / "demo").write_text("a file where the demo folder goes")
    args = [
        *lavender_flight_command(),
        "--demo",
        "--no-ui",
        "--port",
        "0",
        "--data-home",
        str(tmp_path),
    ]
    failed = launch(args)
    assert failed.process.wait(timeout=START_TIMEOUT) != 0
    assert "Not a directory" in failed.rest_of_stderr()

    (tmp_path / "demo").unlink()
    served = launch(args)
    check_demo(served.wait_until_serving())
    stop_cleanly(served)


def test_modules_dir_and_workers(launch: Launcher, connect: None, tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "custom_filter.py").write_text(
        "from lavender_flight.transforms import Filter\n\n"
        'class UidModFilter(Filter, name="uid_mod"):\n'
        "    def filter(self, sample: dict, *, mod: int = 2) -> bool:\n"
        '        return sample["uid"] % self.mod == 0\n'
    )
    (modules / "broken.py").write_text("import not_a_module_anywhere\n")
    served = launch(
        [*lavender_flight_command(), "serve", "--no-ui", "--port", "0", "--data-home",
         str(tmp_path), "--demo", "--modules-dir", str(modules), "--workers", "1"]
    )  # fmt: skip
    url = served.wait_until_serving()
    served.wait_for(re.compile(r"plugins .*uid_mod.*; 1 preprocessing workers"))
    served.wait_for(re.compile(r"plugins  NOT LOADED .*broken\.py: ModuleNotFoundError"))
    lavender.init(url, timeout=30)
    demo = lavender.get_dataset(name="demo")
    it = Iteration.from_dataset(
        demo.id, batch_size=100, filters=[("uid_mod", {"mod": 4})], preprocessors=["byte_tokenize"]
    )
    uids = [u for batch in it for u in batch["uid"]]
    assert uids == list(range(0, demo.total_samples, 4))
    stop_cleanly(served)


# -- what goes wrong at start: one line, naming the flag and the fix ----------------------

ERROR = "lavender-flight: error: "


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (
            ["--log-level", "verbose"],
            {},
            "--log-level verbose: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        (["--workers", "-1"], {}, "--workers -1: must be at least 0"),
        (["--port", "70000"], {}, "--port 70000: must be at most 65535"),
        (["--shutdown-grace", "soon"], {}, "--shutdown-grace soon: must be a number"),
        (
            ["--lease-seconds", "0", "--join-cache-mb", "lots"],
            {},
            "--lease-seconds 0: must be more than 0.0; --join-cache-mb lots: must be a whole "
            "number",
        ),
        (
            [],
            {"LAVENDER_FLIGHT_PORT": "notaport"},
            "LAVENDER_FLIGHT_PORT='notaport': must be a whole number (fix or unset the "
            "environment variable)",
        ),
        (
            [],
            {"LAVENDER_FLIGHT_DEMO": "maybe"},
            "LAVENDER_FLIGHT_DEMO='maybe': must be true or false (or 1/0, yes/no, on/off) "
            "(fix or unset the environment variable)",
        ),
        (
            [],
            {"LAVENDER_FLIGHT_LOG_LEVEL": "loud"},
            "LAVENDER_FLIGHT_LOG_LEVEL='loud': must be one of DEBUG, INFO, WARNING, ERROR, "
            "CRITICAL (fix or unset the environment variable)",
        ),
        (["--tls-cert", "cert.pem"], {}, "TLS needs both --tls-cert and --tls-key"),
        (
            ["--api-keys-file", "/nonexistent/keys"],
            {},
            "cannot read --api-keys-file /nonexistent/keys: [Errno 2] No such file or "
            "directory: '/nonexistent/keys'",
        ),
    ],
    ids=[
        "log-level",
        "workers",
        "port",
        "grace",
        "two-at-once",
        "env-port",
        "env-bool",
        "env-log-level",
        "tls-half",
        "keys-file",
    ],
)
def test_a_bad_value_is_one_line_and_exit_code_2(
    args: list[str], env: dict[str, str], line: str, tmp_path: Path
) -> None:
    done = run_quickly(
        [*lavender_flight_command(), "--no-ui", "--data-home", str(tmp_path), *args],
        # port 0 unless the case sets one: a case that wrongly starts takes no fixed port
        env=clean_env(**{"LAVENDER_FLIGHT_PORT": "0", **env}),
    )
    assert (done.returncode, done.stderr) == (2, ERROR + line + "\n")
    assert not (tmp_path / "catalog.db").exists(), "it started before checking its flags"


def test_a_busy_port_says_so(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_quickly(
            [
                *lavender_flight_command(),
                "--no-ui",
                "--port",
                str(port),
                "--data-home",
                str(tmp_path),
            ]
        )
    assert (done.returncode, done.stderr) == (
        1,
        f"{ERROR}cannot listen on 127.0.0.1:{port}: the port is in use (another server?); "
        "stop it, pick another --port, or --port 0 for a free one\n",
    )


def test_a_host_of_another_machine_says_so(tmp_path: Path) -> None:
    done = run_quickly(
        [
            *lavender_flight_command(),
            "--no-ui",
            "--port",
            "0",
            "--host",
            "192.0.2.1",
            "--data-home",
            str(tmp_path),
        ]
    )
    assert (done.returncode, done.stderr) == (
        1,
        f"{ERROR}cannot listen on 192.0.2.1:0: 192.0.2.1 is not an address of this machine; "
        "pick another --host (127.0.0.1 for this machine only, 0.0.0.0 for all)\n",
    )


@pytest.mark.parametrize("kind", ["not-sqlite", "folder"])
def test_an_unreadable_catalog_says_so(tmp_path: Path, kind: str) -> None:
    catalog = tmp_path / "catalog.db"
    if kind == "folder":
        catalog.mkdir()
        why = "it is a folder, not a file; pick another --catalog (or --data-home)"
    else:
        catalog.write_text("these are my notes, not a database\n")
        why = (
            "it is not an SQLite database; pick another --catalog (or --data-home), or move "
            "that file away"
        )
    done = run_quickly(
        [*lavender_flight_command(), "--no-ui", "--port", "0", "--catalog", str(catalog)]
    )
    assert (done.returncode, done.stderr) == (
        1,
        f"{ERROR}cannot open the catalog {catalog}: {why}\n",
    )
    if kind == "not-sqlite":
        assert catalog.read_text() == "these are my notes, not a database\n"


def test_reload_is_accepted_and_says_it_does_nothing(launch: Launcher, tmp_path: Path) -> None:
    served = launch([*PYTHON_M, "--no-ui", "--port", "0", "--data-home", str(tmp_path), "--reload"])
    served.wait_until_serving()
    served.wait_for(re.compile(r"^  reload   "), timeout=5)
    assert served.lines[-1] == (
        "  reload   --reload is accepted but does nothing: plugins and --modules-dir modules "
        "load once, at start; restart the server to pick up changed ones"
    )
    stop_cleanly(served)


# -- logging ------------------------------------------------------------------------------


def test_a_fresh_demo_start_logs_no_alarming_line(launch: Launcher, tmp_path: Path) -> None:
    served = launch([*PYTHON_M, "--demo", "--no-ui", "--port", "0", "--data-home", str(tmp_path)])
    served.wait_until_serving()
    stop_cleanly(served)
    logged = [line for line in served.lines if re.match(r"^\d{4}-\d\d-\d\d ", line)]
    assert [line.split(" ", 3)[3] for line in logged] == [
        f"lavender_flight.flight_server.demo: created demo dataset 'demo' (5000 rows) under "
        f"{tmp_path / 'demo'}"
    ]


def fetch_dashboard(served: Served) -> str:
    """Load the dashboard page and one static file it names, as a browser would."""
    ui = served.wait_for(re.compile(r"^  ui       (http://\S+)"), timeout=START_TIMEOUT).group(1)
    with urllib.request.urlopen(ui, timeout=30) as page:
        html = page.read().decode()
    static = re.search(r'src="(/?static/[^"]+)"', html)
    assert static, "the page names no static file"
    with urllib.request.urlopen(urllib.parse.urljoin(ui, static.group(1)), timeout=30) as file:
        assert file.status == 200
    return static.group(1).lstrip("/").split("?")[0]


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_the_dashboards_access_log_shows_only_at_debug(
    launch: Launcher, tmp_path: Path, level: str
) -> None:
    served = launch(
        [
            *PYTHON_M,
            "--port",
            "0",
            "--ui-port",
            "0",
            "--data-home",
            str(tmp_path),
            "--log-level",
            level,
        ]
    )
    served.wait_until_serving()
    static = fetch_dashboard(served)
    stop_cleanly(served)
    access = [line for line in served.lines if "tornado.access" in line]
    if level == "DEBUG":
        assert any(static in line and " 200 GET " in line for line in access), access
    else:
        assert access == []
        assert not [line for line in served.lines if "bokeh.server" in line]


CLOSED_WEBSOCKET = """
import asyncio, gc, logging
from tornado.websocket import WebSocketClosedError
from lavender_flight.flight_server.logs import configure_logging

configure_logging({level!r})

async def closed():
    raise WebSocketClosedError()

async def broken():
    raise RuntimeError("a real problem")

async def main():
    tasks = [asyncio.ensure_future(closed()), asyncio.ensure_future(broken())]
    await asyncio.sleep(0.1)
    del tasks  # nobody retrieves their exceptions: asyncio logs them when they are collected
    gc.collect()
    sender = logging.getLogger("bokeh.server.views.ws")
    sender.warning("Failed sending message as connection was closed")
    sender.warning("another warning")

asyncio.run(main())
"""


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_a_closed_websocket_is_not_logged_as_an_error(level: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CLOSED_WEBSOCKET.format(level=level)],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env=clean_env(),
        check=True,
    )
    assert "RuntimeError: a real problem" in done.stderr  # other errors still show
    assert "WARNING bokeh.server.views.ws: another warning" in done.stderr
    noise = ["WebSocketClosedError", "Failed sending message as connection was closed"]
    shown = [text for text in noise if text in done.stderr]
    assert shown == (noise if level == "DEBUG" else []), done.stderr
