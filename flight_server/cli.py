"""``lavender-flight``: the command line; ``python -m lavender_flight.flight_server`` too."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from pydantic_settings import BaseSettings

from ..catalog import open_catalog
from ..protocol.errors import LavenderError
from ..transforms import Plugins
from .auth import ApiKeyMiddlewareFactory
from .demo import DEMO_DATASET, create_demo
from .server import LavenderFlightServer
from .service import LavenderService
from .settings import ServerSettings

__all__ = ["build_parser", "main", "serve"]

log = logging.getLogger("lavender_flight")


def _help(field: str) -> str:
    info = ServerSettings.model_fields[field]
    env = f"LAVENDER_FLIGHT_{field.upper()}"
    return f"{info.description} [env {env}; default {info.default}]"


def add_settings_flags(
    parser: argparse.ArgumentParser,
    settings: type[BaseSettings],
    exclusive: Sequence[tuple[str, ...]] = (),
) -> None:
    """Add one ``--flag`` per settings field (booleans are switches).

    A flag left out falls back to the environment, then the default, so every flag is also
    ``LAVENDER_FLIGHT_<FLAG>``.
    """
    groups = {}
    for names in exclusive:
        group = parser.add_mutually_exclusive_group()
        groups.update(dict.fromkeys(names, group))
    for name, info in settings.model_fields.items():
        target: Any = groups.get(name, parser)
        flag = "--" + name.replace("_", "-")
        kind = info.annotation
        if kind is bool:
            target.add_argument(
                flag, action="store_true", default=argparse.SUPPRESS, help=_help(name)
            )
            continue
        if getattr(kind, "__origin__", None) is list or str(kind).startswith("list["):
            target.add_argument(
                flag, action="append", default=argparse.SUPPRESS,
                metavar=name.split("_")[-1].upper(), help=_help(name) + " (repeatable)",
            )  # fmt: skip
            continue
        number = int if kind in (int, int | None) else float if kind is float else None
        target.add_argument(
            flag, type=number, default=argparse.SUPPRESS, metavar=name.split("_")[-1].upper(),
            help=_help(name),
        )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; flags left out fall back to the environment, then defaults."""
    parser = argparse.ArgumentParser(
        prog="lavender-flight",
        description="Lavender Flight: ML training data over Apache Arrow Flight.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the Flight server (and the dashboard)")
    add_settings_flags(serve_cmd, ServerSettings, exclusive=[("ui_port", "no_ui")])
    commands.add_parser(
        "ui", help="serve only the dashboard, for a running server (lavender-flight ui --help)"
    )
    return parser


def serve(
    settings: ServerSettings,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run a server until SIGINT/SIGTERM (or ``stop`` is set), then shut it down cleanly."""
    keys = settings.api_keys()
    tls = settings.tls_certificates()
    catalog = open_catalog(settings.catalog_target, local_dir=settings.home)
    service = LavenderService(
        catalog,
        storage_defaults=settings.storage_defaults(),
        storage_roots=settings.storage_roots(),
        join_cache_bytes=settings.join_cache_mb << 20,
    )
    if settings.demo:
        create_demo(service, settings.home)
    plugins = Plugins.load(settings.modules_dir)
    extra: dict[str, Any] = {}
    if keys:
        extra["middleware"] = {"auth": ApiKeyMiddlewareFactory(keys)}
    if tls:
        extra["tls_certificates"] = tls
    server = LavenderFlightServer(
        service,
        settings.url,
        plugins,
        settings.worker_count,
        lease_seconds=settings.lease_seconds,
        **extra,
    )
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
    url = f"{settings.scheme}://{settings.host}:{server.port}"
    summary = service.summary()
    print(
        f"Lavender Flight serving {url}\n"
        f"  catalog  {catalog.label} ({summary['datasets']} datasets, "
        f"{summary['samples']} samples)",
        file=sys.stderr,
        flush=True,
    )
    roots = ", ".join(str(r) for r in service.storage_roots or [])
    print(
        f"  security {len(keys)} API keys{'' if keys else ' (open: no --api-key)'}; "
        f"{'TLS' if tls else 'no TLS'}; file:// storage under {roots}",
        file=sys.stderr,
        flush=True,
    )
    names = {i.name for i in plugins.describe()}
    print(
        f"  plugins  {len(names)} ({', '.join(sorted(names))}); "
        f"{settings.worker_count} preprocessing workers",
        file=sys.stderr,
        flush=True,
    )
    for problem in plugins.problems:
        print(f"  plugins  NOT LOADED {problem}", file=sys.stderr, flush=True)
    if settings.demo:
        print(
            f'  demo     dataset {DEMO_DATASET!r}: python -c "from lavender_flight.client import '
            f"api as lavender; lavender.init('{url}'); print(lavender.preview_dataset("
            f"lavender.get_dataset(name='{DEMO_DATASET}').id))\"",
            file=sys.stderr,
            flush=True,
        )
    dashboard = None
    if not settings.no_ui:
        from ..panel_ui import serve_dashboard

        try:
            dashboard = serve_dashboard(
                url,
                settings.ui_port,
                settings.host,
                api_key=keys[0] if keys else None,
                # it calls this very process: its certificate may name another host
                disable_server_verification=bool(tls),
            )
            line = f"{dashboard.url} (--no-ui to go without)"
        except Exception as exc:  # the data server runs on without its dashboard
            line = (
                f"NOT SERVED: cannot listen on {settings.host}:{settings.ui_port} "
                f"({type(exc).__name__}: {exc}); pick another --ui-port"
            )
        print(f"  ui       {line}", file=sys.stderr, flush=True)
    if ready is not None:
        ready.set()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("Lavender Flight shutting down", file=sys.stderr, flush=True)
        if dashboard is not None:
            dashboard.stop()
        # streams end and what they held is saved as pending before the server stops
        parked = server.iterations.park()
        if parked:
            print(f"  parked   {parked} in-flight samples", file=sys.stderr, flush=True)
        server.shutdown()
        catalog.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lavender-flight`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "ui":
        from ..panel_ui import main as ui_main

        return ui_main(args[1:])
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
        args.insert(0, "serve")
    options: dict[str, Any] = vars(build_parser().parse_args(args))
    options.pop("command")
    settings = ServerSettings(**options)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        serve(settings)
    except LavenderError as exc:
        print(f"lavender-flight: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
