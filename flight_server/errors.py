"""The one boundary where exceptions become Flight errors (and nothing else leaks).

Every server method runs inside ``wire_errors`` (``translate_errors`` as a decorator): an
error of ours crosses as its class's ``status`` with the line ``ClassName: message``; any
other exception is first made one of ours (``KeyError`` -> ``NotFound``, ``ValueError`` and
Arrow's invalid/type errors -> ``InvalidArgument``, ``OSError`` -> ``StorageError``, anything
else -> ``ServerError``, whose details go to the server log only).

Nothing of the server's insides crosses. pyarrow sends a raised ``FlightError`` subclass as
its message alone; but NOT_FOUND and INVALID_ARGUMENT can only be produced by raising a
``KeyError``/``ValueError``, which pyarrow wraps with its Python traceback
(``PythonErrorDetail``: ``traceback.format_exception`` of the error, sent in the gRPC message
and trailers). ``install_wire_format`` narrows ``traceback.format_exception`` for the error
instances this module builds, and for nothing else.
"""

from __future__ import annotations

import functools
import logging
import secrets
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

import pyarrow as pa

from ..protocol.errors import (
    FLIGHT_ERRORS,
    InvalidArgument,
    LavenderError,
    NotFound,
    ServerError,
    StorageError,
    WireStatus,
    wire_line,
)

__all__ = ["WireError", "install_wire_format", "to_flight_error", "translate_errors", "wire_errors"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class WireError(Exception):
    """An error this boundary built for the wire (mixed into pyarrow's exception of a status).

    It passes through nested boundaries unchanged, and pyarrow formats it as ``detail``
    instead of a traceback.
    """

    status: ClassVar[WireStatus]
    detail: ClassVar[str]


def _wire_type(status: WireStatus, base: type[Exception]) -> type[Exception]:
    # The detail names the base class of ours of that status: "Detail: Python exception:
    # NotFound" reads as true as pyarrow's own "Detail: Unavailable".
    detail = {WireStatus.NOT_FOUND: "NotFound", WireStatus.INVALID_ARGUMENT: "InvalidArgument"}
    return type(
        f"Wire{base.__name__}",
        (base, WireError),
        {
            "__module__": __name__,
            "__doc__": f"{status.value} on the wire, as {base.__name__}.",
            "status": status,
            "detail": detail.get(status, status.value),
        },
    )


_WIRE_TYPES: dict[WireStatus, type[Exception]] = {
    status: _wire_type(status, base) for status, base in FLIGHT_ERRORS.items()
}


def install_wire_format() -> None:
    """Make pyarrow format our wire errors as one word instead of a traceback.

    pyarrow renders the error detail of a Python exception with the module attribute
    ``traceback.format_exception`` (``arrow/python/common.cc``, ``PythonErrorDetail``); the
    wrapper answers ``[detail]`` for a ``WireError`` and delegates every other call
    unchanged (the server log's tracebacks use ``print_exception`` and are untouched).
    Idempotent; called when the first wire error is built, never at import.
    """
    current = traceback.format_exception
    if getattr(current, "_lavender_wire_format", False):
        return

    @functools.wraps(current)
    def format_exception(exc: Any, /, *args: Any, **kwargs: Any) -> list[str]:
        value = args[0] if args else kwargs.get("value", exc)
        if isinstance(value, WireError):
            return [value.detail]
        return current(exc, *args, **kwargs)

    format_exception._lavender_wire_format = True  # type: ignore[attr-defined]
    traceback.format_exception = format_exception


def _first_line(exc: BaseException) -> str:
    text = str(exc) if not isinstance(exc, KeyError) or len(exc.args) != 1 else str(exc.args[0])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def as_domain_error(exc: BaseException) -> LavenderError:
    """The error of ours that a foreign exception stands for (logged when it is a bug)."""
    if isinstance(exc, LavenderError):
        return exc
    if isinstance(exc, KeyError):
        log.debug("KeyError sent as NotFound", exc_info=exc)
        return NotFound(_first_line(exc))
    if isinstance(exc, (ValueError, pa.ArrowTypeError)):
        log.debug("%s sent as InvalidArgument", type(exc).__name__, exc_info=exc)
        return InvalidArgument(_first_line(exc))
    if isinstance(exc, OSError):
        log.warning("storage error: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return StorageError(_first_line(exc))
    reference = secrets.token_hex(4)
    log.error("unexpected error on the server (ref %s)", reference, exc_info=exc)
    return ServerError(
        f"unexpected {type(exc).__name__} on the server (ref {reference}); the server log "
        "has the details"
    )


def to_flight_error(exc: BaseException) -> Exception:
    """The Flight exception a client should receive for ``exc``.

    Its gRPC status is the class's ``status`` (NOT_FOUND, INVALID_ARGUMENT...) for any Flight
    client; its message ``ClassName: message`` lets our client rebuild the same class.
    """
    if isinstance(exc, WireError):
        return exc
    error = as_domain_error(exc)
    install_wire_format()
    return _WIRE_TYPES[error.status](wire_line(error))


@contextmanager
def wire_errors() -> Iterator[None]:
    """Turn any exception raised inside into the Flight error a client should see."""
    try:
        yield
    except Exception as exc:
        error = to_flight_error(exc)
        if error is exc:
            raise
        raise error from None


def translate_errors(method: F) -> F:
    """Decorate a server method so its errors cross the wire as Flight errors."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with wire_errors():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
