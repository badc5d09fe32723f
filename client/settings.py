"""``ClientSettings``: everything a connection to a Lavender Flight server needs, in one value.

The value is frozen and picklable, so whatever reopens a connection elsewhere (a spawned
DataLoader worker, a reconnecting stream) reopens it from the same settings: URLs, key,
timeout and TLS alike. This module is the one place that knows the default URL and reads
the environment (``LAVENDER_FLIGHT_API_URL``, ``LAVENDER_FLIGHT_API_KEY``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from ..protocol.errors import InvalidArgument
from ..protocol.wire import problems

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_PORT",
    "DEFAULT_RECONNECT_SECONDS",
    "DEFAULT_TIMEOUT",
    "ENV_API_KEY",
    "ENV_API_URL",
    "SCHEMES",
    "ClientSettings",
]

DEFAULT_PORT = 8815
DEFAULT_API_URL = f"grpc://127.0.0.1:{DEFAULT_PORT}"
"""Where a client connects when neither an argument nor the environment names a server."""

DEFAULT_TIMEOUT = 30.0
DEFAULT_RECONNECT_SECONDS = 30.0
ENV_API_URL = "LAVENDER_FLIGHT_API_URL"
"""Environment variable naming the server (several: separated by commas)."""
ENV_API_KEY = "LAVENDER_FLIGHT_API_KEY"
"""Environment variable holding the API key."""

SCHEMES = ("grpc", "grpc+tcp", "grpc+tls", "grpc+unix")
"""The URL schemes of Arrow Flight servers."""


def _url(text: str) -> str:
    """One server URL, checked: a Flight scheme (``grpc://`` when none) and a host."""
    url = text.strip()
    if "://" not in url:
        url = "grpc://" + url
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme in ("http", "https"):
        try:
            name = urlsplit(url).hostname or "HOST"
        except ValueError:
            name = "HOST"
        name = f"[{name}]" if ":" in name else name
        raise InvalidArgument(
            f"api_url {text!r} is an HTTP address, but a Lavender Flight server speaks Arrow "
            f"Flight (gRPC): use grpc://{name}:{DEFAULT_PORT} (grpc+tls://{name}:{DEFAULT_PORT} "
            "for a server with TLS)"
        )
    if scheme not in SCHEMES:
        raise InvalidArgument(
            f"api_url {text!r} has the scheme {scheme!r}; a Lavender Flight server is reached "
            f"at grpc://HOST:{DEFAULT_PORT} (grpc+tls://HOST:{DEFAULT_PORT} for a server with TLS)"
        )
    if not rest.strip("/"):
        raise InvalidArgument(f"api_url {text!r} names no host: use grpc://HOST:{DEFAULT_PORT}")
    return f"{scheme}://{rest}"


def _urls(api_url: str | Sequence[str]) -> tuple[str, ...]:
    """The URLs of one string (several separated by commas) or of a sequence of strings."""
    if isinstance(api_url, str):
        items = api_url.split(",")
    elif isinstance(api_url, Sequence):
        items = [str(item) for item in api_url]
    else:
        raise InvalidArgument(
            f"api_url must be a URL or a list of URLs, got {type(api_url).__name__}"
        )
    urls = tuple(_url(item) for item in items if item.strip())
    if not urls:
        raise InvalidArgument(f"api_url names no server: use grpc://HOST:{DEFAULT_PORT}")
    return urls


def _pem(certs: str | bytes | None) -> bytes | None:
    if certs is None:
        return None
    data = certs.encode() if isinstance(certs, str) else bytes(certs)
    if b"-----BEGIN" not in data:
        raise InvalidArgument(
            "tls_root_certs must be the PEM text of the CA certificate (-----BEGIN "
            "CERTIFICATE-----...), not a file name: pass open('ca.pem').read()"
        )
    return data


class ClientSettings(BaseModel):
    """What a connection to a Lavender Flight server needs: URLs, key, timeout, TLS, reconnects.

    Build it with the constructor (nothing read from the environment) or with
    :meth:`from_env` (the URL and key default to the environment). It is frozen, hashable
    and picklable; :meth:`replace` makes a changed copy. ``repr`` never shows the API key.

    Attributes:
        api_urls: The server's URLs, ``grpc://HOST:PORT`` or ``grpc+tls://HOST:PORT``; the
            first is used (several are kept for failing over between nodes).
        api_key: Sent as ``authorization: Bearer <key>`` on every call (a ``SecretStr``).
        timeout: Seconds each call may take (streams have no timeout).
        tls_root_certs: PEM of the CA that signed a ``grpc+tls://`` server's certificate
            (a self-signed certificate: the certificate itself); None: the system's CAs.
        disable_server_verification: Do not check the server's certificate (tests only:
            anyone on the network could pose as the server).
        reconnect_seconds: How long a broken stream keeps trying to reconnect before it
            fails (0: it fails at once).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_urls: tuple[str, ...] = Field(min_length=1)
    api_key: SecretStr | None = None
    timeout: float = Field(gt=0, allow_inf_nan=False)
    tls_root_certs: bytes | None = Field(default=None, repr=False)
    disable_server_verification: bool = False
    reconnect_seconds: float = Field(ge=0, allow_inf_nan=False)

    def __init__(
        self,
        api_url: str | Sequence[str] = DEFAULT_API_URL,
        *,
        api_key: str | SecretStr | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tls_root_certs: str | bytes | None = None,
        disable_server_verification: bool = False,
        reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
    ) -> None:
        """Settings for the server at ``api_url`` (one URL, or a list to fail over between).

        Raises:
            InvalidArgument: a URL that is not a Flight server's (``http://...``), TLS roots
                that are not PEM, a timeout that is not positive...; one line saying what to
                pass instead.
        """
        if isinstance(api_key, SecretStr):
            api_key = api_key.get_secret_value()
        try:
            super().__init__(
                api_urls=_urls(api_url),
                api_key=api_key or None,
                timeout=timeout,
                tls_root_certs=_pem(tls_root_certs),
                disable_server_verification=disable_server_verification,
                reconnect_seconds=reconnect_seconds,
            )
        except ValidationError as exc:
            raise InvalidArgument(f"invalid client settings: {problems(exc)}") from None

    @classmethod
    def from_env(
        cls,
        api_url: str | Sequence[str] | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tls_root_certs: str | bytes | None = None,
        disable_server_verification: bool = False,
        reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
    ) -> ClientSettings:
        """Settings from the arguments; the URL and key not given come from the environment.

        ``api_url`` defaults to ``LAVENDER_FLIGHT_API_URL`` (several URLs separated by
        commas), else ``grpc://127.0.0.1:8815``; ``api_key`` to ``LAVENDER_FLIGHT_API_KEY``.
        """
        url = api_url if api_url is not None else os.environ.get(ENV_API_URL, "").strip()
        key = api_key if api_key is not None else os.environ.get(ENV_API_KEY, "").strip()
        return cls(
            url or DEFAULT_API_URL,
            api_key=key or None,
            timeout=timeout,
            tls_root_certs=tls_root_certs,
            disable_server_verification=disable_server_verification,
            reconnect_seconds=reconnect_seconds,
        )

    @property
    def api_url(self) -> str:
        """The URL connections use (the first of ``api_urls``)."""
        return self.api_urls[0]

    def api_key_value(self) -> str | None:
        """The API key itself (None: no key)."""
        return self.api_key.get_secret_value() if self.api_key is not None else None

    def replace(self, **changes: Any) -> ClientSettings:
        """A copy with some fields changed (checked like the constructor's arguments).

        ``api_url`` (or ``api_urls``) takes one URL or a list.
        """
        fields: dict[str, Any] = {
            "api_url": self.api_urls,
            "api_key": self.api_key_value(),
            "timeout": self.timeout,
            "tls_root_certs": self.tls_root_certs,
            "disable_server_verification": self.disable_server_verification,
            "reconnect_seconds": self.reconnect_seconds,
        }
        if "api_urls" in changes:
            changes["api_url"] = changes.pop("api_urls")
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise InvalidArgument(
                f"unknown client setting(s) {', '.join(unknown)}; settings: {', '.join(fields)}"
            )
        fields.update(changes)
        url = fields.pop("api_url")
        return ClientSettings(url, **fields)
