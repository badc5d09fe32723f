"""``ClientSettings``, ``LavenderClient(settings)`` and the default client of ``lavender.init``."""

from __future__ import annotations

import ast
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lavender_flight.client import ClientSettings, LavenderClient
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer
from lavender_flight.protocol.errors import InvalidArgument, ServerUnavailable

CLIENT_ROOT = Path(__file__).resolve().parents[2]
PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def no_client_env(monkeypatch: pytest.MonkeyPatch, reset_client: None) -> Iterator[None]:
    """No client setting in the environment, no default client, no failed init."""
    monkeypatch.delenv("LAVENDER_FLIGHT_API_URL", raising=False)
    monkeypatch.delenv("LAVENDER_FLIGHT_API_KEY", raising=False)
    lavender._failure = None
    yield None
    lavender._failure = None


# -- the value ----------------------------------------------------------------------------


def test_one_url_or_several_become_a_tuple_and_the_first_is_used() -> None:
    one = ClientSettings("grpc://a:1")
    assert (one.api_urls, one.api_url) == (("grpc://a:1",), "grpc://a:1")
    several = ClientSettings(["grpc://a:1", "grpc+tls://b:2"])
    assert several.api_urls == ("grpc://a:1", "grpc+tls://b:2")
    assert several.api_url == "grpc://a:1"
    assert ClientSettings("grpc://a:1, grpc://b:2").api_urls == ("grpc://a:1", "grpc://b:2")
    assert ClientSettings("data-host:8815").api_url == "grpc://data-host:8815"
    assert ClientSettings().api_url == "grpc://127.0.0.1:8815"


def test_settings_are_frozen_picklable_and_never_show_the_key() -> None:
    settings = ClientSettings(
        "grpc+tls://h:1",
        api_key="s3cret-key",
        timeout=4.5,
        tls_root_certs=PEM.decode(),
        disable_server_verification=False,
        reconnect_seconds=12,
    )
    with LavenderClient(settings.replace(api_url="grpc://127.0.0.1:1")) as client:
        shown = [repr(settings), str(settings), repr(client)]
    assert not [text for text in shown if "s3cret-key" in text]
    assert "api_key=SecretStr('**********')" in repr(settings)
    again = pickle.loads(pickle.dumps(settings))
    assert again == settings and hash(again) == hash(settings)
    assert again.api_key_value() == "s3cret-key"
    assert (again.timeout, again.tls_root_certs, again.reconnect_seconds) == (4.5, PEM, 12.0)
    with pytest.raises(ValueError, match="frozen"):
        settings.timeout = 1  # type: ignore[misc]
    changed = settings.replace(timeout=2, api_url=["grpc://x:1", "grpc://y:2"])
    assert (changed.timeout, changed.api_urls) == (2.0, ("grpc://x:1", "grpc://y:2"))
    assert changed.api_key_value() == "s3cret-key" and settings.timeout == 4.5
    assert ClientSettings().reconnect_seconds == 30.0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"api_url": "http://localhost:8000"},
            "api_url 'http://localhost:8000' is an HTTP address, but a Lavender Flight server "
            "speaks Arrow Flight (gRPC): use grpc://localhost:8815 (grpc+tls://localhost:8815 "
            "for a server with TLS)",
        ),
        ({"api_url": "https://[::1]:8000/api"}, "use grpc://[::1]:8815"),
        ({"api_url": "ftp://h:1"}, "has the scheme 'ftp'; a Lavender Flight server is reached"),
        ({"api_url": "grpc://"}, "names no host"),
        ({"api_url": []}, "names no server"),
        ({"timeout": 0}, "invalid client settings: timeout: Input should be greater than 0"),
        ({"reconnect_seconds": -1}, "reconnect_seconds: Input should be greater than"),
        ({"tls_root_certs": "ca.pem"}, "must be the PEM text of the CA certificate"),
    ],
)
def test_settings_that_cannot_work_fail_in_one_line(
    arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)) as refused:
        ClientSettings(**arguments)  # type: ignore[arg-type]
    assert "\n" not in str(refused.value)


def test_from_env_reads_the_url_and_key_arguments_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAVENDER_FLIGHT_API_URL", raising=False)
    monkeypatch.delenv("LAVENDER_FLIGHT_API_KEY", raising=False)
    plain = ClientSettings.from_env()
    assert (plain.api_url, plain.api_key) == ("grpc://127.0.0.1:8815", None)
    monkeypatch.setenv("LAVENDER_FLIGHT_API_URL", "grpc://a:1,grpc://b:2")
    monkeypatch.setenv("LAVENDER_FLIGHT_API_KEY", "env-key")
    from_env = ClientSettings.from_env(timeout=3)
    assert from_env.api_urls == ("grpc://a:1", "grpc://b:2")
    assert (from_env.api_key_value(), from_env.timeout) == ("env-key", 3.0)
    given = ClientSettings.from_env("grpc://c:3", "arg-key")
    assert (given.api_urls, given.api_key_value()) == (("grpc://c:3",), "arg-key")
    assert ClientSettings("grpc://c:3").api_key is None  # the constructor never reads it


def test_the_default_url_and_the_environment_are_written_in_one_module() -> None:
    wanted = {"LAVENDER_FLIGHT_API_URL", "LAVENDER_FLIGHT_API_KEY", "grpc://127.0.0.1:8815", 8815}
    found = sorted(
        (str(path.relative_to(CLIENT_ROOT)), str(node.value))
        for folder in ("client", "panel_ui")
        for path in (CLIENT_ROOT / folder).glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in wanted
    )
    assert found == [
        ("client/settings.py", "8815"),
        ("client/settings.py", "LAVENDER_FLIGHT_API_KEY"),
        ("client/settings.py", "LAVENDER_FLIGHT_API_URL"),
    ]


def test_a_client_takes_settings() -> None:
    with pytest.raises(InvalidArgument, match=r"LavenderClient\(ClientSettings\('grpc://HOST"):
        LavenderClient("grpc://127.0.0.1:1")  # type: ignore[arg-type]


# -- lavender.init and the default client ----------------------------------------------------


def test_the_seeds_http_url_fails_at_once_and_leaves_no_client(
    server: LavenderFlightServer, no_client_env: None
) -> None:
    good = f"grpc://127.0.0.1:{server.port}"
    lavender.init(good, timeout=10)
    assert lavender.list_datasets() == []
    with pytest.raises(InvalidArgument) as refused:
        lavender.init(api_url="http://localhost:8000")
    assert str(refused.value).startswith(
        "api_url 'http://localhost:8000' is an HTTP address, but a Lavender Flight server speaks "
        "Arrow Flight (gRPC): use grpc://localhost:8815"
    )
    assert lavender._client is None
    # neither the previous connection nor the default address is used
    for call in (lavender.list_datasets, lambda: lavender.get_dataset(name="x")):
        with pytest.raises(ServerUnavailable, match="call lavender.init first") as refused_call:
            call()
        text = str(refused_call.value)
        assert "the last lavender.init(...) failed (InvalidArgument: api_url" in text
        assert "127.0.0.1:8815" not in text and "\n" not in text
    lavender.init(good, timeout=10)
    assert lavender.list_datasets() == []


def test_a_call_before_any_init_connects_with_the_environments_settings(
    server: LavenderFlightServer, no_client_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"grpc://127.0.0.1:{server.port}"
    monkeypatch.setenv("LAVENDER_FLIGHT_API_URL", url)
    assert lavender._client is None
    assert lavender.create_dataset(name="auto").name == "auto"
    client = lavender.get_client()
    assert client.api_url == url and client.settings == ClientSettings(url)


def test_a_bad_environment_url_is_a_failed_init_too(
    no_client_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAVENDER_FLIGHT_API_URL", "http://data-host:8000")
    with pytest.raises(InvalidArgument, match="use grpc://data-host:8815"):
        lavender.list_datasets()
    with pytest.raises(ServerUnavailable, match="call lavender.init first"):
        lavender.list_datasets()


def test_init_takes_whole_settings_alone(server: LavenderFlightServer, no_client_env: None) -> None:
    settings = ClientSettings(f"grpc://127.0.0.1:{server.port}", timeout=7)
    client = lavender.init(settings)
    assert client.settings is settings and lavender.get_client() is client
    with pytest.raises(InvalidArgument, match="init takes ClientSettings alone"):
        lavender.init(settings, api_key="k")
