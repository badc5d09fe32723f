"""The one exception tree of Lavender Flight, shared by server and client.

Each class carries its wire status (``status``, one of ``WireStatus``): the server's one
boundary (``flight_server/errors.py``) sends it as that gRPC status with the one-line message
``ClassName: message``, and the client (``from_flight_error``) rebuilds the same class from
the class name, so a user sees ``DatasetNotFound: no dataset named 'x'`` whatever side raised
it, and any other Flight client sees the status and that line::

    LavenderError                      any error of ours            (INTERNAL)
    ├── NotFound                       no such thing                (NOT_FOUND)
    │   ├── DatasetNotFound
    │   ├── ShardsetNotFound
    │   ├── ShardNotFound
    │   ├── IterationNotFound
    │   └── ActionNotFound
    ├── AlreadyExists                  name or index taken          (INVALID_ARGUMENT, see below)
    │   ├── DatasetAlreadyExists
    │   ├── ShardAlreadyExists
    │   └── IterationConflict          an iteration id taken by a different spec
    ├── InvalidArgument                bad input, nothing changed   (INVALID_ARGUMENT)
    │   ├── InvalidLocation            unknown protocol, a file, unreachable
    │   ├── SchemaMismatch             a shard disagrees with the declared columns
    │   ├── InvalidRequest             garbage body, ticket or descriptor
    │   └── IterationBusy              still has open streams (force=True ends them)
    ├── TransformFailed                a plugin raised on a sample  (INTERNAL)
    ├── StorageError                   reading or writing storage failed (UNAVAILABLE)
    ├── ServerUnavailable              the client cannot reach the server (client side only)
    ├── Unauthenticated                missing or wrong API key     (UNAUTHENTICATED)
    └── ServerError                    a bug or an unexpected failure on the server (INTERNAL)

``AlreadyExists`` travels as ``INVALID_ARGUMENT``: gRPC has ``ALREADY_EXISTS`` and Arrow maps
its ``StatusCode::AlreadyExists`` to it, but a Python Flight server cannot produce that code
(pyarrow maps a raised exception to a status by its builtin base, ``MapPyError``, which has no
"already exists", and ``FlightError`` has no such subclass). The class name in the message
keeps the distinction for our client; it is a ``ValueError`` like ``InvalidArgument``.
"""

from __future__ import annotations

import enum
import re
from typing import ClassVar

import pyarrow as pa
import pyarrow.flight as flight

from .redaction import redact_urls

__all__ = [
    "FLIGHT_ERRORS",
    "ActionNotFound",
    "AlreadyExists",
    "DatasetAlreadyExists",
    "DatasetNotFound",
    "InvalidArgument",
    "InvalidLocation",
    "InvalidRequest",
    "IterationBusy",
    "IterationConflict",
    "IterationNotFound",
    "LavenderError",
    "NotFound",
    "SchemaMismatch",
    "ServerError",
    "ServerUnavailable",
    "ShardAlreadyExists",
    "ShardNotFound",
    "ShardsetNotFound",
    "StorageError",
    "TransformFailed",
    "Unauthenticated",
    "WireStatus",
    "error_class",
    "from_flight_error",
    "wire_line",
]


class WireStatus(str, enum.Enum):
    """The gRPC status an error crosses the wire with (what any Flight client sees)."""

    NOT_FOUND = "NOT_FOUND"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


# The pyarrow exception that carries each status: what the server raises for it, and what a
# pyarrow client receives. NOT_FOUND and INVALID_ARGUMENT have no FlightError subclass;
# pyarrow derives them from the builtin base (KeyError, ValueError) of what was raised.
FLIGHT_ERRORS: dict[WireStatus, type[Exception]] = {
    WireStatus.NOT_FOUND: pa.ArrowKeyError,
    WireStatus.INVALID_ARGUMENT: pa.ArrowInvalid,
    WireStatus.UNAVAILABLE: flight.FlightUnavailableError,
    WireStatus.UNAUTHENTICATED: flight.FlightUnauthenticatedError,
    WireStatus.INTERNAL: flight.FlightInternalError,
}


class LavenderError(Exception):
    """Base class of every error Lavender Flight raises on purpose.

    A password inside a URL of the message (``https://user:pw@host``) is shown as ``***``:
    messages name locations, and they reach clients and logs.
    """

    status: ClassVar[WireStatus] = WireStatus.INTERNAL

    def __init__(self, message: str) -> None:
        message = redact_urls(message)
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(LavenderError, KeyError):
    """The named dataset, shardset, shard, iteration or action does not exist."""

    status = WireStatus.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class DatasetNotFound(NotFound):
    """No dataset with that name or id."""


class ShardsetNotFound(NotFound):
    """No shardset with that id in the dataset."""


class ShardNotFound(NotFound):
    """No shard with that index in the shardset."""


class IterationNotFound(NotFound):
    """No iteration with that id."""


class ActionNotFound(NotFound):
    """The server has no action of that name."""


class AlreadyExists(LavenderError, ValueError):
    """A name or index is taken already (INVALID_ARGUMENT on the wire: see the module doc)."""

    status = WireStatus.INVALID_ARGUMENT


class DatasetAlreadyExists(AlreadyExists):
    """A dataset of that name exists."""


class ShardAlreadyExists(AlreadyExists):
    """The shard index is taken in that shardset (write with ``overwrite=True`` to replace)."""


class IterationConflict(AlreadyExists):
    """An iteration of that id exists with a different spec (ranks must pass the same one)."""


class InvalidArgument(LavenderError, ValueError):
    """The request is wrong; nothing was changed."""

    status = WireStatus.INVALID_ARGUMENT


class InvalidLocation(InvalidArgument):
    """A shardset location is not a usable folder URL."""


class SchemaMismatch(InvalidArgument):
    """A shard's columns or types disagree with the shardset's declared columns."""


class InvalidRequest(InvalidArgument):
    """An action body, descriptor or ticket could not be decoded or validated."""


class IterationBusy(InvalidArgument):
    """An iteration (or the dataset it reads) still has open streams.

    End them first, or delete with ``force=True``.
    """


class TransformFailed(LavenderError):
    """A filter, collater or preprocessor raised on a sample (after its retries)."""


class StorageError(LavenderError, OSError):
    """Reading or writing shard storage failed."""

    status = WireStatus.UNAVAILABLE


class ServerUnavailable(LavenderError, ConnectionError):
    """The client could not reach the server (not running, wrong address, network down)."""

    status = WireStatus.UNAVAILABLE


class Unauthenticated(LavenderError):
    """The call carried no valid API key."""

    status = WireStatus.UNAUTHENTICATED


class ServerError(LavenderError):
    """An unexpected failure on the server (a bug): the server log has the traceback."""


def _all_subclasses(cls: type[LavenderError]) -> list[type[LavenderError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


def error_class(name: str) -> type[LavenderError] | None:
    """Return the error class called ``name`` (as sent over the wire), or None."""
    for cls in _all_subclasses(LavenderError):
        if cls.__name__ == name:
            return cls
    return None


# gRPC sends the message in trailing metadata twice (percent-encoded in grpc-message, base64
# in Arrow's x-arrow-status-message-bin): up to 4.4 bytes per byte of UTF-8. A client refuses
# trailers over its limit (8 KiB by default, soft), and a longer message would turn into an
# unreadable "received metadata size exceeds limit".
MAX_WIRE_BYTES = 1000
_WIRE_LINE = re.compile(r"^(?P<cls>[A-Z][A-Za-z]+): (?P<message>.*)$", re.DOTALL)
# What pyarrow appends after the message: ". Detail: <status detail>" (and, on a client
# whose own side failed too, ". Client context: ...").
_DETAIL = ". Detail: "


def wire_line(error: LavenderError) -> str:
    """The one line ``error`` crosses the wire as: ``ClassName: message``.

    Line breaks become spaces and a message over ``MAX_WIRE_BYTES`` is cut (ending ``...``),
    so every Flight client can show it and gRPC never refuses it.
    """
    message = " ".join(part.strip() for part in error.message.splitlines() if part.strip())
    line = f"{type(error).__name__}: {message}"
    encoded = line.encode()
    if len(encoded) > MAX_WIRE_BYTES:
        line = encoded[: MAX_WIRE_BYTES - 3].decode(errors="ignore") + "..."
    return line


def from_flight_error(exc: BaseException, url: str = "") -> LavenderError:
    """The error of ours that a Flight error stands for.

    A message ``ClassName: message`` from our server gives back that very class. Anything
    else (the server is unreachable, a proxy or another Flight server answered) is mapped by
    its status: UNAVAILABLE and timeouts are ``ServerUnavailable`` (naming ``url``),
    UNAUTHENTICATED is ``Unauthenticated``, the rest ``ServerError``.
    """
    text = str(exc).split(_DETAIL, 1)[0].strip()
    match = _WIRE_LINE.match(text)
    if match:
        cls = error_class(match.group("cls"))
        if cls is not None:
            return cls(match.group("message"))
    if isinstance(exc, FLIGHT_ERRORS[WireStatus.UNAVAILABLE]):
        return ServerUnavailable(
            f"cannot reach the Lavender Flight server at {url or 'its address'}: {text} "
            "(is `lavender-flight serve` running?)"
        )
    if isinstance(exc, flight.FlightTimedOutError):
        return ServerUnavailable(f"the server at {url} did not answer in time: {text}")
    if isinstance(exc, FLIGHT_ERRORS[WireStatus.UNAUTHENTICATED]):
        return Unauthenticated(text)
    return ServerError(text)
