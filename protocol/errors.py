"""The one exception tree of Lavender Flight, shared by server and client.

Each class carries its wire meaning (``code``): the server turns it into the matching Flight
error, and the client turns that back into the same class, so a user sees
``DatasetNotFound: no dataset named 'x'`` whatever side raised it::

    LavenderError                      any error of ours            (INTERNAL)
    ├── NotFound                       no such thing                (NOT_FOUND)
    │   ├── DatasetNotFound
    │   ├── ShardsetNotFound
    │   ├── ShardNotFound
    │   ├── IterationNotFound
    │   └── ActionNotFound
    ├── AlreadyExists                  name or index taken          (ALREADY_EXISTS)
    │   ├── DatasetAlreadyExists
    │   ├── ShardAlreadyExists
    │   └── IterationConflict          an iteration id taken by a different spec
    ├── InvalidArgument                bad input, nothing changed   (INVALID_ARGUMENT)
    │   ├── InvalidLocation            unknown protocol, a file, unreachable
    │   ├── SchemaMismatch             a shard disagrees with the declared columns
    │   └── InvalidRequest             garbage body, ticket or descriptor
    ├── TransformFailed                a plugin raised on a sample  (INTERNAL)
    ├── StorageError                   reading or writing storage failed (UNAVAILABLE)
    ├── ServerUnavailable              the client cannot reach the server (UNAVAILABLE)
    ├── Unauthenticated                missing or wrong API key     (UNAUTHENTICATED)
    └── ServerError                    a bug or an unexpected failure on the server (INTERNAL)

``ALREADY_EXISTS`` travels as ``INVALID_ARGUMENT`` on the wire (pyarrow cannot raise the former
from Python); the class name in the message keeps the distinction for our client.
"""

from __future__ import annotations

from typing import ClassVar

from .redaction import redact_urls

__all__ = [
    "ActionNotFound",
    "AlreadyExists",
    "DatasetAlreadyExists",
    "DatasetNotFound",
    "InvalidArgument",
    "InvalidLocation",
    "InvalidRequest",
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
    "error_class",
]


class LavenderError(Exception):
    """Base class of every error Lavender Flight raises on purpose.

    A password inside a URL of the message (``https://user:pw@host``) is shown as ``***``:
    messages name locations, and they reach clients and logs.
    """

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        message = redact_urls(message)
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(LavenderError, KeyError):
    """The named dataset, shardset, shard, iteration or action does not exist."""

    code = "NOT_FOUND"

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
    """A name or index is taken already."""

    code = "ALREADY_EXISTS"


class DatasetAlreadyExists(AlreadyExists):
    """A dataset of that name exists."""


class ShardAlreadyExists(AlreadyExists):
    """The shard index is taken in that shardset (write with ``overwrite=True`` to replace)."""


class IterationConflict(AlreadyExists):
    """An iteration of that id exists with a different spec (ranks must pass the same one)."""


class InvalidArgument(LavenderError, ValueError):
    """The request is wrong; nothing was changed."""

    code = "INVALID_ARGUMENT"


class InvalidLocation(InvalidArgument):
    """A shardset location is not a usable folder URL."""


class SchemaMismatch(InvalidArgument):
    """A shard's columns or types disagree with the shardset's declared columns."""


class InvalidRequest(InvalidArgument):
    """An action body, descriptor or ticket could not be decoded or validated."""


class TransformFailed(LavenderError):
    """A filter, collater or preprocessor raised on a sample (after its retries)."""


class StorageError(LavenderError, OSError):
    """Reading or writing shard storage failed."""

    code = "UNAVAILABLE"


class ServerUnavailable(LavenderError, ConnectionError):
    """The client could not reach the server (not running, wrong address, network down)."""

    code = "UNAVAILABLE"


class Unauthenticated(LavenderError):
    """The call carried no valid API key."""

    code = "UNAUTHENTICATED"


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
