"""The Flight connection of a client: calls, typed bodies, and errors rebuilt as our classes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
from pydantic import BaseModel

from ..protocol.errors import LavenderError, from_flight_error

__all__ = ["LavenderClient", "domain_error"]


def domain_error(exc: BaseException, url: str = "") -> LavenderError:
    """The error of ours that a Flight error stands for (its class is named in the message)."""
    return from_flight_error(exc, url)


class LavenderClient:
    """A connection to one Lavender Flight server.

    Every call has a timeout (``timeout`` seconds) so a dead server fails fast instead of
    hanging a training job; streams have none, they last as long as the data.
    """

    def __init__(
        self,
        api_url: str = "grpc://127.0.0.1:8815",
        api_key: str | None = None,
        timeout: float = 30.0,
        tls_root_certs: str | bytes | None = None,
        disable_server_verification: bool = False,
    ) -> None:
        """Connect to ``api_url``.

        Args:
            api_url: ``grpc://HOST:PORT``, or ``grpc+tls://HOST:PORT`` for a TLS server.
            api_key: sent as ``authorization: Bearer <key>`` on every call.
            timeout: seconds each call may take.
            tls_root_certs: PEM of the CA that signed the server's certificate (a
                self-signed certificate: the certificate itself); default: the system's.
            disable_server_verification: do not check the server's certificate (testing
                only: anyone on the network could pose as the server).
        """
        if "://" not in api_url:
            api_url = "grpc://" + api_url
        self.api_url = api_url
        self.api_key = api_key
        self.timeout = timeout
        self._headers = [(b"authorization", f"Bearer {api_key}".encode())] if api_key else []
        tls: dict[str, Any] = {}
        if tls_root_certs is not None:
            tls["tls_root_certs"] = (
                tls_root_certs.encode() if isinstance(tls_root_certs, str) else tls_root_certs
            )
        if disable_server_verification:
            tls["disable_server_verification"] = True
        with self.errors():
            self.flight = flight.connect(api_url, **tls)

    def options(self, timeout: float | None = -1.0) -> flight.FlightCallOptions:
        """Call options: the API key header and a timeout (None: no timeout)."""
        return flight.FlightCallOptions(
            timeout=self.timeout if timeout == -1.0 else timeout, headers=self._headers
        )

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Rebuild server errors as our exception classes, with no gRPC dump."""
        try:
            yield
        except LavenderError:
            raise
        except (flight.FlightError, pa.ArrowException) as exc:
            raise domain_error(exc, self.api_url) from None

    def action(self, name: str, body: BaseModel | dict[str, Any] | None = None) -> bytes:
        """Run ``do_action`` and return its answer's bytes."""
        if isinstance(body, BaseModel):
            payload = body.model_dump_json(by_alias=True).encode()
        else:
            payload = json.dumps(body or {}).encode()
        with self.errors():
            results = list(self.flight.do_action(flight.Action(name, payload), self.options()))
        return results[0].body.to_pybytes() if results else b""

    def action_json(self, name: str, body: BaseModel | dict[str, Any] | None = None) -> Any:
        """Run ``do_action`` and decode its JSON answer."""
        answer = self.action(name, body)
        return json.loads(answer) if answer else None

    def close(self) -> None:
        """Close the connection."""
        self.flight.close()

    def __enter__(self) -> LavenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
