"""API keys: a Flight server middleware that refuses every call without a valid bearer key."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

import pyarrow.flight as flight

from ..protocol.errors import Unauthenticated
from .errors import to_flight_error

__all__ = ["ApiKeyMiddlewareFactory", "bearer_key"]


def bearer_key(headers: dict[str, list[str | bytes]]) -> str | None:
    """The key of an ``authorization: Bearer <key>`` header, if there is one."""
    for value in headers.get("authorization", []):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, key = text.strip().partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return key.strip()
    return None


class ApiKeyMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Checks the API key of every call (actions, streams, puts, listings) before it runs.

    Keys are compared in constant time, each against every configured key, so timing tells
    nothing about how much of a key was right. A refused call gets ``Unauthenticated``
    through the one error boundary (UNAUTHENTICATED on the wire; our client raises the
    same class).
    """

    def __init__(self, keys: Iterable[str]) -> None:
        super().__init__()
        self._keys = [k.encode() for k in keys if k]
        if not self._keys:
            raise ValueError("ApiKeyMiddlewareFactory needs at least one key")

    def accepts(self, key: str | None) -> bool:
        """Whether ``key`` is one of the configured keys."""
        if key is None:
            return False
        given = key.encode()
        found = False
        for known in self._keys:
            found |= hmac.compare_digest(given, known)
        return found

    def start_call(
        self, info: flight.CallInfo, headers: dict[str, list[str | bytes]]
    ) -> flight.ServerMiddleware | None:
        """Refuse the call unless it carries a valid key."""
        key = bearer_key(headers)
        if key is None:
            raise to_flight_error(
                Unauthenticated(
                    "this server needs an API key: pass api_key= to lavender.init (or set "
                    "LAVENDER_FLIGHT_API_KEY); other Flight clients send the header "
                    "'authorization: Bearer <key>'"
                )
            )
        if not self.accepts(key):
            raise to_flight_error(Unauthenticated("the API key is not valid"))
        return None
