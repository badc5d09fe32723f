"""The server's logging: our lines at the chosen level, other libraries' chatter kept down.

Below ``--log-level DEBUG``:

- the dashboard's access log (``tornado.access``: one INFO line per static file) and bokeh's
  per-connection INFO lines are off; their warnings and errors stay;
- gRPC's own stderr logging (``GRPC_VERBOSITY``) is off unless the environment sets it: it
  reports a busy port in two lines of C++ before our one line says it plainly;
- a browser leaving a page while the dashboard updates it (its websocket closed mid-write)
  is not logged as an error with a traceback: tornado raises ``WebSocketClosedError`` in a
  task nobody awaits (asyncio logs "Task exception was never retrieved") and bokeh warns
  "Failed sending message as connection was closed". Only that is dropped.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["ClosedWebSocketNoise", "configure_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CHATTY = ("tornado.access", "bokeh.server.server", "bokeh.server.views.ws")
CLOSED_SENDING = "Failed sending message as connection was closed"
# the loggers that report a closed websocket: asyncio's default exception handler, tornado's
# callbacks, bokeh's and panel's senders
NOISY = ("asyncio", "tornado.application", "bokeh.server.views.ws", "panel.io.document")


def _closed_websocket(exc: BaseException | None) -> bool:
    closed = tuple(
        getattr(sys.modules.get(module), name)
        for module, name in (
            ("tornado.websocket", "WebSocketClosedError"),
            ("tornado.iostream", "StreamClosedError"),
        )
        if hasattr(sys.modules.get(module), name)
    )
    return bool(closed) and isinstance(exc, closed)


class ClosedWebSocketNoise(logging.Filter):
    """Drops the records of a browser that left a page (shown again at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but a closed websocket's (unless the server logs at DEBUG)."""
        exc = record.exc_info[1] if record.exc_info else None
        noise = _closed_websocket(exc) or record.getMessage() == CLOSED_SENDING
        return not noise or logging.getLogger("lavender_flight").isEnabledFor(logging.DEBUG)


def configure_logging(level: str | None) -> None:
    """Log at ``level`` (DEBUG, INFO...; None: leave the level alone) with the rules above."""
    if level is not None:
        logging.basicConfig(level=level, format=FORMAT)
    debug = level == "DEBUG"
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.WARNING)
    if not debug:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    for name in NOISY:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ClosedWebSocketNoise) for f in logger.filters):
            logger.addFilter(ClosedWebSocketNoise())
