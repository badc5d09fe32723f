"""Serving the dashboard: its routes, an in-process server with ``stop()``, and ``main``.

``lavender-flight serve --ui-port 3000`` starts it next to the Flight server with
:func:`serve_dashboard`; ``lavender-flight ui --api-url grpc://HOST:PORT --port 3000`` runs
:func:`main`. Everything the browser loads comes from this server (Bokeh's and Panel's
bundled JS and CSS): no CDN, no web fonts, so it works without internet.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import html
import logging
import secrets
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import panel as pn
from bokeh.settings import settings as bokeh_settings
from tornado.platform.asyncio import AsyncIOLoop

from ..client.connection import LavenderClient
from ..client.settings import (
    DEFAULT_API_URL,
    DEFAULT_TIMEOUT,
    ENV_API_KEY,
    ENV_API_URL,
    ClientSettings,
)
from ..protocol.errors import LavenderError
from .common import TABLE_CSS, describe_error, navigation
from .datasets import DatasetPage, DatasetsPage
from .iteration import IterationPage
from .iterations import IterationsPage
from .login import KeyLogin
from .nodes import NodesPage
from .plugins import PluginsPage
from .shardsets import ShardsetPage

if TYPE_CHECKING:
    from panel.io.application import TViewableFuncOrPath

__all__ = ["DashboardServer", "add_arguments", "build_routes", "main", "serve_dashboard"]

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

TITLES = {
    "/": "Datasets",
    "/datasets": "Datasets",
    "/dataset": "Dataset",
    "/shardset": "Shardset",
    "/iteration": "Iteration",
    "/iterations": "Iterations",
    "/nodes": "Nodes",
    "/plugins": "Plugins",
}


def _arg(name: str) -> str:
    """A query argument of the page's URL (``/dataset?id=...``), or empty."""
    values = pn.state.session_args.get(name) or [b""]
    value = values[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def _safely(make: Callable[[], pn.viewable.Viewer]) -> Callable[[], pn.viewable.Viewable]:
    """A route that shows a failure as one readable line instead of a blank page."""

    @functools.wraps(make)
    def route() -> pn.viewable.Viewable:
        try:
            return make().__panel__()
        except Exception as exc:
            return pn.Column(
                navigation("Something went wrong"),
                pn.pane.HTML(
                    f'<div class="lf-alert lf-error" role="alert">'
                    f"{html.escape(describe_error(exc))}</div>",
                    stylesheets=[TABLE_CSS],
                ),
            )

    return route


def build_routes(client: LavenderClient) -> dict[str, TViewableFuncOrPath]:
    """The pages by URL path; each call makes a fresh page for one browser session."""

    def datasets() -> DatasetsPage:
        return DatasetsPage(client=client)

    def dataset() -> DatasetPage:
        return DatasetPage(client=client, dataset_id=_arg("id"))

    def shardset() -> ShardsetPage:
        return ShardsetPage(client=client, dataset_id=_arg("dataset"), shardset_id=_arg("id"))

    def iteration() -> IterationPage:
        page = IterationPage(client=client, iteration_id=_arg("id"))
        pn.state.onload(page.start_polling)  # once a browser is connected to the session
        return page

    def iterations() -> IterationsPage:
        return IterationsPage(client=client, dataset_id=_arg("dataset"))

    def nodes() -> NodesPage:
        page = NodesPage(client=client)
        pn.state.onload(page.start_polling)
        return page

    def plugins() -> PluginsPage:
        return PluginsPage(client=client)

    return {
        "/": _safely(datasets),
        "/datasets": _safely(datasets),
        "/dataset": _safely(dataset),
        "/shardset": _safely(shardset),
        "/iteration": _safely(iteration),
        "/iterations": _safely(iterations),
        "/nodes": _safely(nodes),
        "/plugins": _safely(plugins),
    }


def _origins(address: str, port: int, extra: Sequence[str]) -> set[str]:
    hosts = {"127.0.0.1", "localhost"}
    if address not in ("", "0.0.0.0", "::"):
        hosts.add(f"[{address}]" if ":" in address else address)
    return {f"{host}:{port}" for host in hosts} | set(extra)


def _close_sockets_of(exc: BaseException) -> None:
    """Close the sockets a failed bind left open in the frames of its traceback.

    Tornado's ``bind_sockets`` does not close the socket it could not bind (a taken port),
    which would otherwise be reported as an unclosed resource when collected.
    """
    tb = exc.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, socket.socket):
                value.close()
        tb = tb.tb_next


class DashboardServer:
    """A dashboard served from this process: its ``url``, ``port`` and ``stop()``.

    The Bokeh/Tornado server runs on its own event loop, in a thread of its own
    (``threaded=True``) or in the caller's thread until :meth:`stop` or a signal.
    """

    def __init__(
        self,
        client: LavenderClient,
        port: int,
        address: str = "127.0.0.1",
        websocket_origin: Sequence[str] = (),
        passwords: Sequence[str] = (),
    ) -> None:
        self.client = client
        self._passwords = tuple(p for p in passwords if p)
        self.address = address
        self.port = port
        self._requested_port = port
        self._extra_origins = list(websocket_origin)
        self._server_id = uuid.uuid4().hex
        self._server: Any = None
        self._io_loop: AsyncIOLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._stopped = threading.Event()
        self._stop_requested = False
        self._closed = False

    @property
    def url(self) -> str:
        """Where a browser opens the dashboard."""
        host = "127.0.0.1" if self.address in ("", "0.0.0.0", "::") else self.address
        return f"http://{host}:{self.port}/"

    def _auth_options(self) -> dict[str, Any]:
        """A login page on every page when there are passwords (the server's API keys).

        Any of the keys logs in (compared in constant time, see :class:`KeyLogin`); the
        session cookie is signed with a secret made for this server.
        """
        if not self._passwords:
            return {}
        return {
            "auth_provider": KeyLogin(self._passwords),
            "cookie_secret": secrets.token_urlsafe(32),
        }

    def _listen(self) -> None:
        # Bokeh's "server" resources: its JS and CSS (and Panel's) come from this server.
        bokeh_settings.resources = "server"
        self._io_loop = AsyncIOLoop(make_current=False)
        asyncio.set_event_loop(self._io_loop.asyncio_loop)
        server = pn.io.server.get_server(
            build_routes(self.client),
            port=self._requested_port,
            address=self.address,
            loop=self._io_loop,
            show=False,
            start=False,
            title={path: f"Lavender Flight · {name}" for path, name in TITLES.items()},
            verbose=False,
            server_id=self._server_id,
            **self._auth_options(),
        )
        self._server = server
        self.port = int(server.port or 0)
        # The port is known only now (port 0 picks a free one): allow its origins now.
        server._tornado.websocket_origins.update(
            _origins(self.address, self.port, self._extra_origins)
        )
        server.start()

    def _run(self) -> None:
        try:
            self._listen()
        except BaseException as exc:
            _close_sockets_of(exc)
            self._failure = exc
            self._ready.set()
            self._close_loop()
            return
        self._ready.set()
        try:
            assert self._io_loop is not None
            self._io_loop.start()
        finally:
            pn.state._servers.pop(self._server_id, None)
            self._close_loop()
            self._stopped.set()

    async def _shutdown(self) -> None:
        """Stop listening, close open connections (browser pages), then stop the loop."""
        assert self._io_loop is not None
        try:
            self._server.stop(wait=False)
            await asyncio.wait_for(self._server._http.close_all_connections(), STOP_TIMEOUT)
        except Exception:
            log.exception("the dashboard did not shut down cleanly")
        finally:
            self._io_loop.stop()

    def start(self, threaded: bool = True) -> DashboardServer:
        """Listen and serve; threaded: returns once listening, else runs until stopped."""
        if not threaded:
            self._run()
            if self._failure is not None:
                raise self._failure
            return self
        self._thread = threading.Thread(target=self._run, name="lavender-dashboard", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError(f"the dashboard did not start within {START_TIMEOUT}s")
        if self._failure is not None:
            self._thread.join(STOP_TIMEOUT)
            raise self._failure
        return self

    def request_stop(self) -> None:
        """Ask the server to stop (safe from any thread and from a signal handler)."""
        loop = self._io_loop
        if loop is not None and self._ready.is_set() and not self._stop_requested:
            self._stop_requested = True
            loop.add_callback(self._shutdown)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop serving and close the connection to the Flight server."""
        self.request_stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"the dashboard did not stop within {timeout}s")
        if not self._closed:
            self._closed = True
            self.client.close()

    def _close_loop(self) -> None:
        if self._io_loop is not None:
            self._io_loop.close(all_fds=True)
        asyncio.set_event_loop(None)

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_dashboard(
    api_url: str | ClientSettings,
    port: int,
    address: str = "127.0.0.1",
    api_key: str | None = None,
    show: bool = False,
    threaded: bool = True,
    websocket_origin: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
    tls_root_certs: str | bytes | None = None,
    require_login: bool | None = None,
    disable_server_verification: bool = False,
    login_keys: Sequence[str] | None = None,
) -> DashboardServer:
    """Serve the dashboard of the Flight server at ``api_url`` on ``http://address:port/``.

    The dashboard holds a :class:`LavenderClient` of its own, made from these arguments
    (never from the environment, nor the module-level client of ``lavender.init``).

    Args:
        api_url: The Flight server, ``grpc://HOST:PORT``; or the whole
            :class:`ClientSettings` of the connection (then no ``api_key``, ``timeout``
            or TLS argument).
        port: The HTTP port; 0 picks a free one (read it back from ``.port``).
        address: The interface to listen on.
        api_key: The server's API key, if it needs one.
        show: Open the dashboard in the default web browser.
        threaded: Serve from a background thread and return at once; otherwise serve in
            this thread until ``stop()`` or SIGINT/SIGTERM, then return.
        websocket_origin: More ``host:port`` origins allowed to open pages (behind a proxy).
        timeout: Seconds each call to the Flight server may take.
        tls_root_certs: PEM of the CA of a ``grpc+tls://`` server (default: the system's).
        require_login: Guard every page with a login form asking for an API key
            (default: whenever ``api_key`` is given), so the dashboard is no way around
            the server's keys.
        disable_server_verification: Do not check a ``grpc+tls://`` server's certificate
            (for a dashboard served by the Flight server's own process).
        login_keys: The keys the login accepts, every one of them (default: ``api_key``);
            the Flight server's own process passes all of its keys.

    Returns:
        The running (or, unthreaded, the stopped) server: ``.url``, ``.port``, ``.stop()``.
    """
    if isinstance(api_url, ClientSettings):
        given = (api_key, timeout, tls_root_certs, disable_server_verification)
        if given != (None, DEFAULT_TIMEOUT, None, False):
            raise ValueError(
                "serve_dashboard takes ClientSettings alone: put api_key, timeout and the TLS "
                "options in the settings"
            )
        settings = api_url
    else:
        settings = ClientSettings(
            api_url,
            api_key=api_key,
            timeout=timeout,
            tls_root_certs=tls_root_certs,
            disable_server_verification=disable_server_verification,
        )
    api_key = settings.api_key_value()
    client = LavenderClient(settings)
    keys = [k for k in (login_keys if login_keys is not None else [api_key]) if k]
    login = bool(keys) if require_login is None else require_login
    if login and not keys:
        raise ValueError("require_login needs the api_key (or login_keys) a user logs in with")
    dashboard = DashboardServer(
        client, port, address, websocket_origin, passwords=keys if login else ()
    )
    if show:
        # After listening: the port may be chosen by the system.
        opener = threading.Timer(0.5, lambda: _open_browser(dashboard))
        opener.daemon = True
        opener.start()
    if threaded:
        try:
            return dashboard.start(threaded=True)
        except BaseException:
            client.close()
            raise
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: dashboard.request_stop())
    try:
        return dashboard.start(threaded=False)
    finally:
        dashboard.stop()


def _open_browser(dashboard: DashboardServer) -> None:
    import webbrowser

    if dashboard._ready.wait(START_TIMEOUT) and dashboard._failure is None:
        webbrowser.open(dashboard.url)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``lavender-flight ui`` (for the CLI's subcommand)."""
    parser.add_argument(
        "--api-url",
        default=None,
        help=f"the Flight server to show [env {ENV_API_URL}; default {DEFAULT_API_URL}]",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"its API key, if it needs one [env {ENV_API_KEY}]",
    )
    parser.add_argument(
        "--port", type=int, default=3000, help="HTTP port (0: any free one) [%(default)s]"
    )
    parser.add_argument(
        "--address", default="127.0.0.1", help="interface to listen on [%(default)s]"
    )
    parser.add_argument(
        "--websocket-origin",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="another origin allowed to open pages (the address browsers use behind a proxy "
        "or from another machine); repeatable",
    )
    parser.add_argument("--show", action="store_true", help="open it in a web browser")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lavender-flight ui``: serve the dashboard until SIGINT/SIGTERM."""
    parser = add_arguments(
        argparse.ArgumentParser(
            prog="lavender-flight ui",
            description="The Lavender Flight dashboard, for a running Flight server.",
        )
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
    try:
        settings = ClientSettings.from_env(args.api_url, args.api_key)
    except LavenderError as exc:
        print(f"lavender-flight ui: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    try:
        dashboard = serve_dashboard(
            settings,
            args.port,
            args.address,
            show=args.show,
            websocket_origin=args.websocket_origin,
        )
    except Exception as exc:
        print(
            f"lavender-flight ui: error: cannot serve on {args.address}:{args.port}: "
            f"{type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    print(
        f"Lavender Flight dashboard {dashboard.url} (data from {settings.api_url})",
        file=sys.stderr,
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("Lavender Flight dashboard shutting down", file=sys.stderr, flush=True)
        dashboard.stop()
    return 0
