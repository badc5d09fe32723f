"""The one boundary where domain errors become Flight errors (and nothing else leaks)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from ..protocol.errors import (
    InvalidArgument,
    LavenderError,
    NotFound,
    ServerError,
    StorageError,
    Unauthenticated,
)

__all__ = ["to_flight_error", "translate_errors", "wire_errors"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def to_flight_error(exc: BaseException) -> Exception:
    """The Flight exception a client should receive for ``exc``.

    Its message is ``ClassName: message`` so our client rebuilds the same class; the gRPC
    status is the matching one for any other Flight client (NOT_FOUND, INVALID_ARGUMENT...).
    """
    if isinstance(exc, flight.FlightError):
        return exc
    if not isinstance(exc, LavenderError):
        exc = _as_domain_error(exc)
    text = f"{type(exc).__name__}: {exc}"
    error: Exception
    if isinstance(exc, NotFound):
        error = pa.ArrowKeyError(text)
    elif isinstance(exc, (InvalidArgument, ValueError)):
        error = pa.ArrowInvalid(text)
    elif isinstance(exc, Unauthenticated):
        error = flight.FlightUnauthenticatedError(text)
    elif isinstance(exc, StorageError):
        error = flight.FlightUnavailableError(text)
    else:
        error = flight.FlightInternalError(text)
    return error


def _as_domain_error(exc: BaseException) -> LavenderError:
    if isinstance(exc, (pa.ArrowInvalid, pa.ArrowTypeError)):
        return InvalidArgument(str(exc).splitlines()[0])
    if isinstance(exc, OSError):
        return StorageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    log.error("unexpected error on the server", exc_info=exc)
    return ServerError(f"{type(exc).__name__}: {exc} (see the server log)")


@contextmanager
def wire_errors() -> Iterator[None]:
    """Turn any exception raised inside into the Flight error a client should see."""
    try:
        yield
    except Exception as exc:
        error = to_flight_error(exc)
        if error is exc:
            raise
        # Raised without our frames: pyarrow ships the traceback to the client.
        error.__traceback__ = None
        raise error from None


def translate_errors(method: F) -> F:
    """Decorate a server method so its errors cross the wire as Flight errors."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with wire_errors():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
