"""Stopping a server in bounded time, even while a client holds a stream it does not read.

pyarrow's ``FlightServerBase.shutdown()`` waits for every call to end, without a deadline
(C++ has ``Shutdown(deadline)``, pyarrow does not expose it). A stream whose client stopped
reading is blocked in gRPC's write, flow control full: it never asks our generator for the
next batch, so it never sees that the server parks, and the shutdown never returns.

So: park the streams (what they held is saved as pending: a resume delivers it), give the
calls a grace period to end, then cut the TCP connections of the calls still open (a client
that vanished looks the same to gRPC: the blocked write fails, the call ends, the shutdown
completes and the process exits normally). If even that does not end them, the caller ends
the process.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .server import LavenderFlightServer

__all__ = ["cut_connections", "stop_server"]

CUT_WAIT = 3.0
"""Seconds the shutdown may still take once the connections are cut."""


def _descriptors() -> list[int]:
    for folder in (Path("/proc/self/fd"), Path("/dev/fd")):
        if folder.is_dir():
            return [int(name) for name in os.listdir(folder) if name.isdigit()]
    return []


def cut_connections(port: int) -> int:
    """Shut down every accepted TCP connection of this process on ``port``; how many.

    Only connected sockets whose local port is ``port`` are cut (the clients of our server);
    the listening socket and outbound connections are left alone.
    """
    cut = 0
    for fd in _descriptors():
        try:
            sock = socket.socket(fileno=os.dup(fd))  # a copy: gRPC keeps its descriptor
        except OSError:
            continue  # closed meanwhile, or not a socket
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.type != socket.SOCK_STREAM:
                continue
            try:
                if sock.getsockname()[1] != port:
                    continue
                sock.getpeername()  # the listening socket has no peer
                sock.shutdown(socket.SHUT_RDWR)  # of the connection, not just this copy
            except OSError:
                continue
            cut += 1
    return cut


def stop_server(
    server: LavenderFlightServer,
    grace: float,
    hurry: threading.Event | None = None,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> bool:
    """Park the streams, give open calls ``grace`` seconds, then cut them; True if it stopped.

    ``hurry`` (a second Ctrl-C) ends the grace early. False means the Flight server is still
    stopping after the cut: the caller should end the process.
    """
    parked = server.iterations.park()
    if parked:
        say(f"  parked   {parked} in-flight samples")
    stopping = threading.Thread(target=server.shutdown, name="lavender-shutdown", daemon=True)
    stopping.start()
    deadline = time.monotonic() + grace
    while stopping.is_alive() and time.monotonic() < deadline:
        if hurry is not None and hurry.is_set():
            break
        stopping.join(0.1)
    if not stopping.is_alive():
        return True
    cut = cut_connections(server.port)
    say(
        f"  stopped  {cut} connections with calls still open after the {grace:g}s "
        "--shutdown-grace were cut (clients not reading their streams)"
    )
    stopping.join(CUT_WAIT)
    if not stopping.is_alive():
        return True
    server.iterations.close()  # what the streams held is saved; the workers go
    say(f"  stopped  the Flight server did not stop {CUT_WAIT:g}s after the cut: ending anyway")
    return False
