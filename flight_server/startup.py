"""Why a server cannot start, said in one line that names the flag and the fix.

pydantic, gRPC and the SQLite driver each explain a bad start in their own words (a
validation dump, ``Server did not start properly``, ``failed to allocate memory`` for a
folder); these helpers find the real reason and say it the way a user can act on.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

__all__ = ["StartupError", "catalog_problem", "listen_problem", "setting_problems"]

SQLITE_HEADER = b"SQLite format 3\x00"


class StartupError(Exception):
    """The server could not start; the message is the one line to show."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _what_is_wrong(error: Mapping[str, Any]) -> str:
    kind = str(error.get("type", ""))
    ctx = error.get("ctx") or {}
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type"):
        return "must be a number"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false (or 1/0, yes/no, on/off)"
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "less_than_equal": ("at most", "le"),
        "greater_than": ("more than", "gt"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}"
    message = str(error.get("msg", "is not valid"))
    return message.removeprefix("Value error, ")


def setting_problems(exc: ValidationError, given: Mapping[str, Any]) -> str:
    """One line for every bad setting, each named as the user gave it (flag or variable).

    Args:
        exc: the settings' validation error.
        given: the settings passed as flags; the others came from the environment.
    """
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        value = error.get("input")
        if name in given:
            shown = value if not isinstance(value, list) else " ".join(map(str, value))
            problems.append(f"{_flag(name)} {shown}: {_what_is_wrong(error)}")
        else:
            variable = f"LAVENDER_FLIGHT_{name.upper()}"
            problems.append(
                f"{variable}={value!r}: {_what_is_wrong(error)} (fix or unset the environment "
                "variable)"
            )
    return "; ".join(problems)


def listen_problem(host: str, port: int, tls: bool = False) -> str:
    """Why the Flight server cannot listen on ``host:port`` (pyarrow does not say)."""
    where = f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {where}: --host {host!r} is not a known address ({exc.strerror})"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # as gRPC does: a port left in TIME_WAIT by a stopped server is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (
                        f"cannot listen on {where}: the port is in use (another server?); "
                        "stop it, pick another --port, or --port 0 for a free one"
                    )
                if exc.errno == errno.EADDRNOTAVAIL:
                    return (
                        f"cannot listen on {where}: {host} is not an address of this machine; "
                        "pick another --host (127.0.0.1 for this machine only, 0.0.0.0 for all)"
                    )
                if exc.errno == errno.EACCES:
                    return (
                        f"cannot listen on {where}: ports below 1024 need privileges; pick a "
                        "--port above 1023"
                    )
                return f"cannot listen on {where}: {exc.strerror}; pick another --port or --host"
    if tls:
        return (
            f"cannot start the Flight server on {where}: are --tls-cert and --tls-key a "
            "matching PEM certificate and private key?"
        )
    return f"cannot start the Flight server on {where} (--log-level DEBUG says more)"


def catalog_problem(path: Path, exc: BaseException) -> str:
    """Why the catalog at ``path`` cannot be opened (the driver's words are often misleading)."""
    fix = "pick another --catalog (or --data-home)"
    if path.is_dir():
        return f"cannot open the catalog {path}: it is a folder, not a file; {fix}"
    try:
        with path.open("rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        header = None
    except OSError as error:
        return f"cannot open the catalog {path}: {error.strerror}; {fix}"
    if header and header != SQLITE_HEADER:
        return (
            f"cannot open the catalog {path}: it is not an SQLite database; {fix}, or move "
            "that file away"
        )
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"cannot open the catalog {path}: {first}; {fix}"
