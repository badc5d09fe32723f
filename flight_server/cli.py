"""``lavender-flight``: the command line; ``python -m lavender_flight.flight_server`` too.

Whatever goes wrong before the server serves ends in one line, ``lavender-flight: error:
<what, naming the flag>; <the fix>``, and no traceback: exit code 2 for a bad flag or
environment value, 1 for a failure to start (a busy port, an unreadable catalog...).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from ..catalog import open_catalog, parse_target
from ..protocol.errors import InvalidArgument, LavenderError
from ..transforms import Plugins
from .auth import ApiKeyMiddlewareFactory
from .demo import DEMO_DATASET, create_demo
from .engine import ReadAhead
from .logs import configure_logging
from .memory import MemoryBudget, no_huge_pages, system_allocator, tune_malloc
from .read_pool import ReadPool
from .server import LavenderFlightServer
from .service import LavenderService
from .settings import ServerSettings
from .shutdown import stop_server
from .startup import StartupError, catalog_problem, listen_problem, setting_problems

__all__ = ["build_parser", "main", "serve"]

log = logging.getLogger("lavender_flight")

USAGE = 2
"""Exit code of a bad flag or environment value."""
FAILED = 1
"""Exit code of a server that could not start (or stopped on an error)."""
RELOAD_LINE = (
    "  reload   --reload is accepted but does nothing: plugins and --modules-dir modules load "
    "once, at start; restart the server to pick up changed ones"
)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage dump), with a likely fix."""

    known_flags: Sequence[str] = ()

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` (and "did you mean" for a misspelt flag); exit 2."""
        hint, help_of = "", self.prog
        if message.startswith("unrecognized arguments:"):
            help_of = f"{self.prog} serve"
            flags = [*self.known_flags, *self._option_string_actions]
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], flags, n=1)
                if word.startswith("--") and close:
                    hint = f" (did you mean {close[0]}?)"
                    break
        self.exit(USAGE, f"{self.prog}: error: {message}{hint}; see {help_of} --help\n")


def _help(settings: type[BaseSettings], field: str) -> str:
    info = settings.model_fields[field]
    env = f"LAVENDER_FLIGHT_{field.upper()}"
    default = info.get_default(call_default_factory=True)
    text = info.description or ""
    if (getattr(info.annotation, "__origin__", None) is list) and "repeatable" not in text:
        text += " (repeatable)"
    # None, [] and a switch's False say nothing: the description tells what unset means
    if default is None or default is False or default in ([], ""):
        return f"{text} [env {env}]"
    return f"{text} [env {env}; default {default}]"


def add_settings_flags(
    parser: argparse.ArgumentParser,
    settings: type[BaseSettings],
    exclusive: Sequence[tuple[str, ...]] = (),
) -> None:
    """Add one ``--flag`` per settings field (booleans are switches).

    A flag left out falls back to the environment, then the default, so every flag is also
    ``LAVENDER_FLIGHT_<FLAG>``. Values are checked by the settings (flag or environment
    alike), not by argparse, so both get the same message.
    """
    groups = {}
    for names in exclusive:
        group = parser.add_mutually_exclusive_group()
        groups.update(dict.fromkeys(names, group))
    for name, info in settings.model_fields.items():
        target: Any = groups.get(name, parser)
        flag = "--" + name.replace("_", "-")
        kind = info.annotation
        metavar = name.split("_")[-1].upper()
        if kind is bool:
            target.add_argument(
                flag, action="store_true", default=argparse.SUPPRESS, help=_help(settings, name)
            )
        elif getattr(kind, "__origin__", None) is list or str(kind).startswith("list["):
            target.add_argument(
                flag, action="append", default=argparse.SUPPRESS, metavar=metavar,
                help=_help(settings, name),
            )  # fmt: skip
        else:
            target.add_argument(
                flag, default=argparse.SUPPRESS, metavar=metavar, help=_help(settings, name)
            )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; flags left out fall back to the environment, then defaults."""
    parser = Parser(
        prog="lavender-flight",
        description="Lavender Flight: ML training data over Apache Arrow Flight.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the Flight server (and the dashboard)")
    add_settings_flags(serve_cmd, ServerSettings, exclusive=[("ui_port", "no_ui")])
    serve_cmd.add_argument(
        "--reload",
        action="store_true",
        default=argparse.SUPPRESS,
        help="accepted for lavender-data's command line; does nothing: plugins load once, at "
        "start (restart the server to reload them)",
    )
    commands.add_parser(
        "ui", help="serve only the dashboard, for a running server (lavender-flight ui --help)"
    )
    parser.known_flags = tuple(serve_cmd._option_string_actions)
    return parser


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _start_server(
    settings: ServerSettings, service: LavenderService, plugins: Plugins
) -> LavenderFlightServer:
    extra: dict[str, Any] = {}
    keys = settings.api_keys()
    if keys:
        extra["middleware"] = {"auth": ApiKeyMiddlewareFactory(keys)}
    tls = settings.tls_certificates()
    if tls:
        extra["tls_certificates"] = tls
    try:
        return LavenderFlightServer(
            service,
            settings.url,
            plugins,
            settings.worker_count,
            lease_seconds=settings.lease_seconds,
            advertise=settings.advertise,
            node_timeout=settings.node_timeout,
            read_ahead=ReadAhead(
                seconds=settings.read_ahead_seconds, max_bytes=settings.read_ahead_mb << 20
            ),
            **extra,
        )
    except Exception as exc:  # pyarrow says only "Server did not start properly"
        log.debug("the Flight server did not start", exc_info=exc)
        raise StartupError(listen_problem(settings.host, settings.port, bool(tls))) from None


def _announce(
    settings: ServerSettings,
    service: LavenderService,
    plugins: Plugins,
    url: str,
    keys: int,
    tls: bool,
) -> None:
    summary = service.summary()
    _say(f"Lavender Flight serving {url}")
    _say(
        f"  catalog  {service.catalog.label} ({summary['datasets']} datasets, "
        f"{summary['samples']} samples)"
    )
    roots = ", ".join(str(r) for r in service.storage_roots or [])
    _say(
        f"  security {keys} API keys{'' if keys else ' (open: no --api-key)'}; "
        f"{'TLS' if tls else 'no TLS'}; file:// storage under {roots}; "
        f"protocols {', '.join(service.policy.protocols)}"
    )
    budget = ReadAhead(seconds=settings.read_ahead_seconds, max_bytes=settings.read_ahead_mb << 20)
    _say(f"  streams  read-ahead {budget.describe()}; servers sharing the catalog count as "
         f"dead after {settings.node_timeout:g} s without a heartbeat")  # fmt: skip
    reads = service.read_pool
    ignored = (
        "; --join-cache-mb is part of it now (ignored)"
        if ("join_cache_mb" in settings.model_fields_set)
        else ""
    )
    _say(f"  memory   {service.memory.describe()}; reads: {reads.threads} at once from local "
         f"disks, {reads.remote} per remote store, {settings.read_timeout:g} s timeout"
         f"{ignored}")  # fmt: skip
    names = {i.name for i in plugins.describe()}
    _say(
        f"  plugins  {len(names)} ({', '.join(sorted(names))}); "
        f"{settings.worker_count} preprocessing workers"
    )
    for problem in plugins.problems:
        _say(f"  plugins  NOT LOADED {problem}")
    if settings.demo:
        _say(
            f'  demo     dataset {DEMO_DATASET!r}: python -c "from lavender_flight.client import '
            f"api as lavender; lavender.init('{url}'); print(lavender.preview_dataset("
            f"lavender.get_dataset(name='{DEMO_DATASET}').id))\""
        )


def serve(
    settings: ServerSettings,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
    reload: bool = False,
) -> bool:
    """Run a server until SIGINT/SIGTERM (or ``stop`` is set), then shut it down.

    Stopping parks every iteration stream (their in-flight samples are saved as pending, so a
    resume delivers them), waits up to ``settings.shutdown_grace`` seconds for the open calls
    to end (a second signal cuts the wait short), then cuts the connections of those still
    open (``shutdown.stop_server``).

    Returns:
        True if the Flight server stopped; False if it still waits for calls even after the
        cut: the caller should end the process (``main`` does).

    Raises:
        StartupError: the server could not start (busy port, unreadable catalog...).
        LavenderError: a bad setting (an unreadable keys file...) or a failed demo.
    """
    keys = settings.api_keys()
    tls = bool(settings.tls_certificates())
    target = parse_target(settings.catalog_target)  # an unknown URL fails here, in one line
    try:
        catalog = open_catalog(settings.catalog_target, local_dir=settings.home)
    except Exception as exc:
        if target.backend != "sqlite":
            raise  # an unreachable PostgreSQL says so in one line
        log.debug("cannot open the catalog", exc_info=exc)
        raise StartupError(catalog_problem(target.path, exc)) from None
    try:
        service = LavenderService(
            catalog,
            storage_defaults=settings.storage_defaults(),
            storage_roots=settings.storage_roots(),
            memory=MemoryBudget(settings.memory_bytes),
            read_pool=ReadPool(settings.read_threads, timeout=settings.read_timeout),
            allow_protocols=settings.allow_protocol,
            allow_memory=settings.allow_memory,
            max_shard_bytes=settings.max_shard_mb << 20,
        )
        if settings.demo:
            create_demo(service, settings.home)
        plugins = Plugins.load(settings.modules_dir, timeout=settings.plugin_timeout)
        server = _start_server(settings, service, plugins)
    except BaseException:
        catalog.close()
        raise
    stop = stop or threading.Event()
    hurry = threading.Event()

    def on_signal(*_: object) -> None:
        if stop.is_set():
            hurry.set()  # a second Ctrl-C: do not wait for the grace
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)
    url = f"{settings.scheme}://{settings.host}:{server.port}"
    _announce(settings, service, plugins, url, len(keys), tls)
    if reload:
        _say(RELOAD_LINE)
    dashboard = None
    if not settings.no_ui:
        from ..panel_ui import serve_dashboard

        try:
            dashboard = serve_dashboard(
                url,
                settings.ui_port,
                settings.host,
                api_key=keys[0] if keys else None,
                login_keys=keys,  # the login accepts any of the server's keys
                # it calls this very process: its certificate may name another host
                disable_server_verification=bool(tls),
            )
            line = f"{dashboard.url} (--no-ui to go without)"
        except Exception as exc:  # the data server runs on without its dashboard
            line = (
                f"NOT SERVED: cannot listen on {settings.host}:{settings.ui_port} "
                f"({type(exc).__name__}: {exc}); pick another --ui-port"
            )
        _say(f"  ui       {line}")
    if ready is not None:
        ready.set()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        _say("Lavender Flight shutting down")
        if dashboard is not None:
            dashboard.stop()
        ended = stop_server(server, settings.shutdown_grace, hurry, _say)
        catalog.close()
    return ended


def _usage_error(message: str) -> int:
    _say(f"lavender-flight: error: {message}")
    return USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lavender-flight`` command."""
    no_huge_pages()
    tune_malloc()
    system_allocator()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "ui":
        from ..panel_ui import main as ui_main

        configure_logging(None)
        return ui_main(args[1:])
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
        args.insert(0, "serve")
    options: dict[str, Any] = vars(build_parser().parse_args(args))
    options.pop("command")
    reload = bool(options.pop("reload", False))
    try:
        settings = ServerSettings(**options)
        # the files flags name are read now: a wrong path is a usage error, said at once
        settings.api_keys()
        settings.tls_certificates()
    except ValidationError as exc:
        return _usage_error(setting_problems(exc, given=options))
    except InvalidArgument as exc:
        return _usage_error(str(exc))
    configure_logging(settings.log_level)
    try:
        ended = serve(settings, reload=reload)
    except (StartupError, LavenderError) as exc:
        _say(f"lavender-flight: error: {exc}")
        return FAILED
    except Exception as exc:
        log.debug("the server stopped on an unexpected error", exc_info=exc)
        first = (str(exc).splitlines() or [""])[0]
        _say(
            f"lavender-flight: error: unexpected {type(exc).__name__}: {first} "
            "(--log-level DEBUG shows the traceback)"
        )
        return FAILED
    if not ended:
        _end_process(0)
    return 0


def _end_process(code: int) -> NoReturn:
    """End the process although gRPC still waits for calls (interpreter exit would too).

    What the streams held is saved and the catalog closed before this is called.
    """
    sys.stderr.flush()
    os._exit(code)
