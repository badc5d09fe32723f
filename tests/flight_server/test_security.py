"""Security: API keys on every Flight call and the dashboard, TLS, storage roots.

Each test checks what a user sees: the error class and its text, what the catalog holds after.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import ClientSettings, LavenderClient, Writer
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.auth import ApiKeyMiddlewareFactory
from lavender_flight.flight_server.settings import ServerSettings
from lavender_flight.panel_ui import serve_dashboard
from lavender_flight.protocol.errors import (
    InvalidArgument,
    InvalidLocation,
    ServerUnavailable,
    Unauthenticated,
)
from tests.flight_server.test_cli import (  # noqa: F401  (launch is a fixture)
    Launcher,
    clean_env,
    launch,
    lavender_flight_command,
)

KEY = "k3y-for-tests-0123456789"
OTHER_KEY = "second-key-abcdef"
TIMEOUT = 10.0
COLUMNS = [
    lavender.DatasetColumnOptions(name="uid", type_="int", description="id"),
    lavender.DatasetColumnOptions(name="text", type_="str"),
]


@pytest.fixture
def keyed_server(service: LavenderService) -> Iterator[LavenderFlightServer]:
    """A server that accepts two API keys."""
    srv = LavenderFlightServer(
        service,
        "grpc://127.0.0.1:0",
        middleware={"auth": ApiKeyMiddlewareFactory([KEY, OTHER_KEY])},
    )
    yield srv
    srv.shutdown()


def options(key: str | None = None) -> flight.FlightCallOptions:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    return flight.FlightCallOptions(timeout=TIMEOUT, headers=headers)


# -- API keys -----------------------------------------------------------------------------


def test_without_a_key_every_kind_of_flight_call_is_refused(
    keyed_server: LavenderFlightServer, catalog: Catalog
) -> None:
    url = f"grpc://127.0.0.1:{keyed_server.port}"
    raw = flight.connect(url)
    descriptor = flight.FlightDescriptor.for_path("x")
    calls = {
        "do_action": lambda o: list(
            raw.do_action(flight.Action("create_dataset", b'{"name": "sneaky"}'), o)
        ),
        "list_actions": lambda o: raw.list_actions(o),
        "list_flights": lambda o: list(raw.list_flights(b"", o)),
        "get_flight_info": lambda o: raw.get_flight_info(descriptor, o),
        "do_get": lambda o: raw.do_get(flight.Ticket(b"{}"), o).read_all(),
        "do_put": lambda o: raw.do_put(descriptor, pa.schema([("a", pa.int64())]), o)[0].close(),
    }
    try:
        for name, call in calls.items():
            for key, expected in ((None, "needs an API key"), ("wrong", "is not valid")):
                with pytest.raises(flight.FlightUnauthenticatedError, match=expected):
                    call(options(key))
                    pytest.fail(f"{name} with key {key!r} was allowed")
    finally:
        raw.close()
    assert catalog.list_datasets() == []


def test_our_client_with_a_key_works_and_without_one_gets_unauthenticated(
    keyed_server: LavenderFlightServer, reset_client: None, data_dir: Path
) -> None:
    url = f"grpc://127.0.0.1:{keyed_server.port}"
    lavender.init(url, api_key=None, timeout=TIMEOUT)
    with pytest.raises(Unauthenticated, match="needs an API key: pass api_key="):
        lavender.list_datasets()
    lavender.init(url, api_key="wrong-key", timeout=TIMEOUT)
    with pytest.raises(Unauthenticated, match="the API key is not valid"):
        lavender.create_dataset(name="nope")
    for key in (KEY, OTHER_KEY):
        lavender.init(url, api_key=key, timeout=TIMEOUT)
        assert lavender.list_datasets() == []
    # every path of the client carries the key: actions, do_put, flight info, do_get
    dataset = lavender.create_dataset(name="guarded")
    shardset = lavender.create_shardset(dataset.id, data_dir.as_uri(), COLUMNS)
    Writer.get(dataset_id=dataset.id, shardset_id=shardset.id).write(
        [{"uid": u, "text": str(u)} for u in range(10)], shard_index=0
    )
    assert lavender.read_dataset(dataset.id).num_rows == 10
    assert len(lavender.list_actions()) > 5


def test_api_keys_file_and_comma_list_are_read() -> None:
    settings = ServerSettings(api_key=["a,b", " c "])
    assert settings.api_keys() == ["a", "b", "c"]


def test_api_keys_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalpha  # laptop\n\n  beta\n")
    assert ServerSettings(api_keys_file=keys).api_keys() == ["alpha", "beta"]
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        ServerSettings(api_keys_file=empty).api_keys()


def test_api_key_from_the_environment_is_not_shown_in_repr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAVENDER_FLIGHT_API_KEY", "env-key-1,env-key-2")
    settings = ServerSettings()
    assert settings.api_keys() == ["env-key-1", "env-key-2"]
    assert "env-key-1" not in repr(settings)


# -- dashboard ----------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object) -> None:
        return None


def browser() -> urllib.request.OpenerDirector:
    """A cookie-keeping HTTP client that shows redirects instead of following them."""
    return urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(CookieJar()), _NoRedirect()
    )


def fetch(
    opener: urllib.request.OpenerDirector, url: str, form: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Status, redirect target and body of one request."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    try:
        with opener.open(url, data=data, timeout=TIMEOUT) as answer:
            return answer.status, "", answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location") or "", ""


def test_dashboard_with_a_key_asks_for_it_before_showing_anything(
    keyed_server: LavenderFlightServer,
) -> None:
    url = f"grpc://127.0.0.1:{keyed_server.port}"
    dashboard = serve_dashboard(url, 0, api_key=KEY, timeout=TIMEOUT)
    try:
        stranger = browser()
        status, target, _ = fetch(stranger, dashboard.url)
        assert (status, target) == (302, "./login?next=%2F")
        status, _, page = fetch(stranger, dashboard.url + "login")
        assert status == 200 and 'name="password"' in page and "Datasets" not in page
        status, target, _ = fetch(
            stranger, dashboard.url + "login", {"username": "me", "password": "wrong"}
        )
        assert status == 302 and "error=Invalid" in target
        assert fetch(stranger, dashboard.url)[:2] == (302, "./login?next=%2F")

        user = browser()
        status, target, _ = fetch(
            user, dashboard.url + "login", {"username": "me", "password": KEY}
        )
        assert (status, target) == (302, "/")
        status, _, page = fetch(user, dashboard.url)
        assert status == 200 and "<title>Lavender Flight" in page
    finally:
        dashboard.stop()


def test_dashboard_without_a_key_is_open(server: LavenderFlightServer) -> None:
    dashboard = serve_dashboard(f"grpc://127.0.0.1:{server.port}", 0, timeout=TIMEOUT)
    try:
        status, _, page = fetch(browser(), dashboard.url)
        assert status == 200 and "<title>Lavender Flight" in page
    finally:
        dashboard.stop()


def test_dashboard_of_a_keyed_server_needs_the_key_for_its_own_calls(
    keyed_server: LavenderFlightServer,
) -> None:
    url = f"grpc://127.0.0.1:{keyed_server.port}"
    with LavenderClient(ClientSettings(url, api_key=KEY, timeout=TIMEOUT)) as client:
        assert client.action_json("list_datasets") == []
    with (
        LavenderClient(ClientSettings(url, timeout=TIMEOUT)) as client,
        pytest.raises(Unauthenticated),
    ):
        client.action_json("list_datasets")


# -- TLS ----------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lavender-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_server(service: LavenderService, tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A grpc+tls:// server with a self-signed certificate: its URL and the certificate."""
    cert, key = self_signed(tmp_path)
    srv = LavenderFlightServer(
        service,
        "grpc+tls://127.0.0.1:0",
        tls_certificates=[(cert.read_bytes(), key.read_bytes())],
    )
    yield f"grpc+tls://127.0.0.1:{srv.port}", cert.read_bytes()
    srv.shutdown()


def test_tls_client_that_trusts_the_certificate_works(
    tls_server: tuple[str, bytes], reset_client: None
) -> None:
    url, cert = tls_server
    lavender.init(url, timeout=TIMEOUT, tls_root_certs=cert)
    assert lavender.create_dataset(name="over-tls").name == "over-tls"
    assert [d.name for d in lavender.list_datasets()] == ["over-tls"]


def test_tls_client_verifies_the_server_by_default(
    tls_server: tuple[str, bytes], reset_client: None
) -> None:
    url, _ = tls_server
    lavender.init(url, timeout=TIMEOUT)
    with pytest.raises(ServerUnavailable, match="cannot reach the Lavender Flight server"):
        lavender.list_datasets()
    # opting out of verification is possible, and explicit
    lavender.init(url, timeout=TIMEOUT, disable_server_verification=True)
    assert lavender.list_datasets() == []


def test_dashboard_reaches_a_tls_server(tls_server: tuple[str, bytes]) -> None:
    url, cert = tls_server
    for options in ({"tls_root_certs": cert}, {"disable_server_verification": True}):
        dashboard = serve_dashboard(url, 0, timeout=TIMEOUT, **options)  # type: ignore[arg-type]
        try:
            assert dashboard.client.action_json("list_datasets") == []
        finally:
            dashboard.stop()


def test_plain_client_cannot_talk_to_a_tls_server(
    tls_server: tuple[str, bytes], reset_client: None
) -> None:
    url, _ = tls_server
    lavender.init(url.replace("grpc+tls://", "grpc://"), timeout=TIMEOUT)
    with pytest.raises(ServerUnavailable):
        lavender.list_datasets()


# -- storage roots ------------------------------------------------------------------------


def write_shard_file(folder: Path, column: str = "text") -> None:
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"uid": list(range(5)), column: [str(i) for i in range(5)]}),
        folder / "shard.00000.parquet",
    )


@pytest.fixture
def rooted(catalog: Catalog, tmp_path: Path) -> LavenderService:
    """A service whose storage root is ``tmp_path/root``."""
    (tmp_path / "root").mkdir()
    return LavenderService(catalog, storage_roots=[tmp_path / "root"])


def test_location_inside_a_root_is_accepted(rooted: LavenderService, tmp_path: Path) -> None:
    write_shard_file(tmp_path / "root" / "a")
    dataset = rooted.create_dataset("inside")
    shardset = rooted.create_shardset(dataset.id, (tmp_path / "root" / "a").as_uri())
    assert shardset.total_samples == 5
    assert rooted.preview_dataset(dataset.id, 0, 10, None).num_rows == 5


@pytest.mark.parametrize("how", ["outside", "dotdot", "symlink", "plain-path"])
def test_location_outside_the_roots_is_refused_and_nothing_is_recorded(
    rooted: LavenderService, tmp_path: Path, catalog: Catalog, how: str
) -> None:
    outside = tmp_path / "outside"
    write_shard_file(outside)
    location = {
        "outside": outside.as_uri(),
        "dotdot": "file://" + str(tmp_path / "root") + "/../outside",
        "symlink": (tmp_path / "root" / "link").as_uri(),
        "plain-path": str(outside),
    }[how]
    if how == "symlink":
        (tmp_path / "root" / "link").symlink_to(outside, target_is_directory=True)
    dataset = rooted.create_dataset("escape")
    with pytest.raises(InvalidLocation) as refused:
        rooted.create_shardset(dataset.id, location)
    text = str(refused.value)
    assert "is outside the server's storage roots" in text
    assert str((tmp_path / "root").resolve()) in text
    assert "--storage-root" in text
    with pytest.raises(InvalidLocation, match="outside the server's storage roots"):
        rooted.infer_columns(location)
    assert catalog.get_dataset(dataset_id=dataset.id).shardsets == []


def test_a_shardset_whose_folder_left_the_roots_is_not_read(
    catalog: Catalog, tmp_path: Path
) -> None:
    write_shard_file(tmp_path / "data")
    open_service = LavenderService(catalog)
    dataset = open_service.create_dataset("moved")
    open_service.create_shardset(dataset.id, (tmp_path / "data").as_uri())
    (tmp_path / "root").mkdir()
    rooted = LavenderService(catalog, storage_roots=[tmp_path / "root"])
    with pytest.raises(InvalidLocation, match="outside the server's storage roots"):
        rooted.preview_dataset(dataset.id, 0, 10, None)


def test_default_roots_are_the_data_home_and_the_start_folder(tmp_path: Path) -> None:
    settings = ServerSettings(data_home=tmp_path / "home")
    assert settings.storage_roots(cwd=tmp_path / "cwd") == [
        (tmp_path / "home").resolve(),
        (tmp_path / "cwd").resolve(),
    ]
    # --storage-root adds to them (the demo and the start folder keep working)
    given = ServerSettings(
        data_home=tmp_path / "home", storage_root=[tmp_path / "a", tmp_path / "b"]
    )
    assert given.storage_roots(cwd=tmp_path / "cwd") == [
        (tmp_path / "home").resolve(),
        (tmp_path / "cwd").resolve(),
        (tmp_path / "a").resolve(),
        (tmp_path / "b").resolve(),
    ]


def test_storage_roots_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "LAVENDER_FLIGHT_STORAGE_ROOT", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}"
    )
    assert ServerSettings(data_home=tmp_path / "home").storage_roots(cwd=tmp_path)[2:] == [
        (tmp_path / "a").resolve(),
        (tmp_path / "b").resolve(),
    ]


# -- the command line ---------------------------------------------------------------------

SERVING = re.compile(r"^Lavender Flight serving (grpc(?:\+tls)?://[\w.\-]+:(\d+))\s*$")


@pytest.mark.slow
def test_cli_with_keys_tls_and_roots(
    launch: Launcher,  # noqa: F811
    reset_client: None,
    tmp_path: Path,
) -> None:
    cert, key = self_signed(tmp_path)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# keys\n{OTHER_KEY}\n")
    root = tmp_path / "root"
    write_shard_file(root / "a")
    write_shard_file(tmp_path / "outside")
    start_dir = tmp_path / "cwd"
    start_dir.mkdir()
    served = launch(
        [
            *lavender_flight_command(),
            "serve",
            "--ui-port",
            "0",
            "--port",
            "0",
            "--data-home",
            str(tmp_path / "home"),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--api-keys-file",
            str(keys),
            "--storage-root",
            str(root),
            "--storage-root",
            str(tmp_path / "second"),
        ],
        env=clean_env(LAVENDER_FLIGHT_API_KEY=KEY),
        cwd=start_dir,
    )
    url = served.wait_for(SERVING).group(1)
    assert url.startswith("grpc+tls://")
    security = served.wait_for(re.compile(r"^\s+security\s"))
    assert "2 API keys; TLS; file:// storage under" in security.string
    assert KEY not in served.stderr and OTHER_KEY not in served.stderr
    lavender.init(url, timeout=TIMEOUT, tls_root_certs=cert.read_bytes())
    with pytest.raises(Unauthenticated):
        lavender.list_datasets()
    for good in (KEY, OTHER_KEY):
        lavender.init(url, api_key=good, timeout=TIMEOUT, tls_root_certs=cert.read_bytes())
        assert isinstance(lavender.list_datasets(), list)
    dataset = lavender.create_dataset(name="cli")
    assert lavender.create_shardset(dataset.id, (root / "a").as_uri()).total_samples == 5
    with pytest.raises(InvalidLocation, match="outside the server's storage roots") as refused:
        lavender.create_shardset(dataset.id, (tmp_path / "outside").as_uri())
    assert str(root.resolve()) in str(refused.value)
    # --storage-root adds to the default roots: the start folder stays one
    write_shard_file(start_dir / "c", column="note")
    assert lavender.create_shardset(dataset.id, (start_dir / "c").as_uri()).total_samples == 5
    assert len(lavender.get_dataset(dataset.id).shardsets) == 2
    # the dashboard reaches the TLS server with a key, behind its login
    page = served.wait_for(re.compile(r"^\s+ui\s+(http://\S+/)")).group(1)
    user = browser()
    assert fetch(user, page + "login", {"username": "x", "password": KEY})[:2] == (302, "/")
    status, _, body = fetch(user, page + "datasets")
    assert status == 200 and "<title>Lavender Flight · Datasets</title>" in body
    assert served.stop() == 0


@pytest.mark.slow
def test_cli_default_roots_allow_the_start_folder_only(
    launch: Launcher,  # noqa: F811
    reset_client: None,
    tmp_path: Path,
) -> None:
    start_dir = tmp_path / "cwd"
    write_shard_file(start_dir / "shards")
    write_shard_file(tmp_path / "elsewhere")
    served = launch(
        [
            *lavender_flight_command(),
            "serve",
            "--no-ui",
            "--port",
            "0",
            "--data-home",
            str(tmp_path / "home"),
        ],
        cwd=start_dir,
    )
    lavender.init(served.wait_for(SERVING).group(1), timeout=TIMEOUT)
    dataset = lavender.create_dataset(name="defaults")
    relative = lavender.create_shardset(dataset.id, "shards")
    assert relative.location == (start_dir / "shards").resolve().as_uri()
    with pytest.raises(InvalidLocation, match="outside the server's storage roots"):
        lavender.create_shardset(dataset.id, (tmp_path / "elsewhere").as_uri())
    assert os.path.isdir(tmp_path / "home")
    assert served.stop() == 0


@pytest.mark.slow
def test_cli_dashboard_of_a_keyed_server_needs_the_key(
    launch: Launcher,  # noqa: F811
    tmp_path: Path,
) -> None:
    served = launch(
        [
            *lavender_flight_command(),
            "serve",
            "--ui-port",
            "0",
            "--port",
            "0",
            "--data-home",
            str(tmp_path),
        ],
        env=clean_env(LAVENDER_FLIGHT_API_KEY=KEY),
    )
    served.wait_for(SERVING)
    page = served.wait_for(re.compile(r"^\s+ui\s+(http://\S+/)")).group(1)
    stranger = browser()
    assert fetch(stranger, page)[:2] == (302, "./login?next=%2F")
    user = browser()
    assert fetch(user, page + "login", {"username": "x", "password": KEY})[:2] == (302, "/")
    status, _, body = fetch(user, page)
    assert status == 200 and "<title>Lavender Flight" in body
    assert served.stop() == 0


# -- names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shown"),
    [("a\x00b", "U+0000 at position 1"), ("two\nlines", "U+000A at position 3"),
     ("tab\t", "U+0009 at position 3"), ("\x1b[31mred", "U+001B at position 0"),
     ("del\x7f", "U+007F at position 3"), ("sep\u2028", "U+2028 at position 3")],
)  # fmt: skip
def test_names_with_control_characters_are_refused(
    client: LavenderClient, catalog: Catalog, data_dir: Path, name: str, shown: str
) -> None:
    line = f"holds a control character ({shown}): use printable characters only"
    with pytest.raises(InvalidArgument) as refused:
        lavender.create_dataset(name=name)
    assert str(refused.value) == f"dataset name {name!r} {line}"
    with pytest.raises(InvalidArgument, match=re.escape(f"uid column name {name!r} {line}")):
        lavender.create_dataset(name="fine", uid_column_name=name)
    assert catalog.list_datasets() == []
    dataset = lavender.create_dataset(name="ok")
    columns = [*COLUMNS, lavender.DatasetColumnOptions(name=name, type_="int")]
    with pytest.raises(InvalidArgument, match=re.escape(f"column name {name!r} {line}")):
        lavender.create_shardset(dataset.id, data_dir.as_uri(), columns)
    location = f"{data_dir}/x{name}y"
    with pytest.raises(InvalidArgument, match=re.escape(f"location {location!r} holds a cont")):
        lavender.create_shardset(dataset.id, location, COLUMNS)
    import pyarrow.parquet as pq

    folder = data_dir / "inferred"
    folder.mkdir()
    pq.write_table(pa.table({"uid": [1], name: [2]}), folder / "shard.00000000.parquet")
    with pytest.raises(InvalidArgument, match=re.escape(f"{name!r} {line}")):
        lavender.create_shardset(dataset.id, folder.as_uri())
    with pytest.raises(InvalidArgument, match=re.escape(f"{name!r} {line}")):
        lavender.infer_columns(folder.as_uri())
    assert lavender.get_dataset(dataset.id).shardsets == []
