"""Secrets by allowlist: only storage options known to be safe are shown back, and never a
password inside a location URL, in answers, errors, the dashboard or the server log."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.flight as flight
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.storage import RetryPolicy, resolve_location
from lavender_flight.panel_ui import DatasetPage, ShardsetPage
from lavender_flight.protocol import ColumnOptions, Shard, Shardset, redact_options
from lavender_flight.protocol.errors import (
    InvalidArgument,
    InvalidLocation,
    ShardNotFound,
    StorageError,
)
from lavender_flight.protocol.records import hidden_values
from lavender_flight.protocol.redaction import redact_urls
from tests.conftest import CALL_TIMEOUT, call_options
from tests.flight_server.conftest import Web

PASSWORD = "pw-0f1e2d3c4b5a"
COLUMNS = [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="text", type_="str")]
FAST = RetryPolicy(attempts=2, first_delay=0.01, max_delay=0.01, deadline=5.0)
SECRETS = ["p4ss-phrase", "auth-t0ken", "nested-p4ss", "proxy-p4ss", "url-p4ss", "AKIAKEY", "sk"]
OPTIONS: dict[str, Any] = {
    "passphrase": "p4ss-phrase",
    "auth": {"user": "me", "token": "auth-t0ken"},
    "client_kwargs": {
        "endpoint_url": "https://me:url-p4ss@objects.example.com",
        "region_name": "eu-west-1",
        "pass": "nested-p4ss",
    },
    "config_kwargs": {
        "read_timeout": 5,
        "retries": {"max_attempts": 2, "secret_mode": "sk"},
        "proxies": {"https": "http://me:proxy-p4ss@proxy"},
    },
    "anon": False,
    "requester_pays": True,
    "key": "AKIAKEY",
    "endpoint_url": ["https://not-a-plain-value"],
}
SHOWN = {
    "passphrase": "***",
    "auth": "***",
    "client_kwargs": {
        "endpoint_url": "https://me:***@objects.example.com",
        "region_name": "eu-west-1",
        "pass": "***",
    },
    "config_kwargs": {
        "read_timeout": 5,
        "retries": {"max_attempts": 2, "secret_mode": "***"},
        "proxies": "***",
    },
    "anon": False,
    "requester_pays": True,
    "key": "***",
    "endpoint_url": "***",
}


@pytest.fixture
def open_service(catalog: Catalog) -> LavenderService:
    """A service that also reads http:// locations (read-only), retrying little."""
    return LavenderService(catalog, retry=FAST, allow_protocols=["http"])


@pytest.fixture
def served(open_service: LavenderService, reset_client: None) -> Iterator[flight.FlightClient]:
    """A server over ``open_service``, our client on it, and a plain Flight client."""
    server = LavenderFlightServer(open_service, "grpc://127.0.0.1:0")
    url = f"grpc://127.0.0.1:{server.port}"
    lavender.init(url, timeout=CALL_TIMEOUT)
    raw = flight.connect(url)
    yield raw
    raw.close()
    server.shutdown()


def raw_action(raw: flight.FlightClient, name: str, body: dict[str, Any]) -> str:
    results = raw.do_action(flight.Action(name, json.dumps(body).encode()), call_options())
    return b"".join(r.body.to_pybytes() for r in results).decode()


def raw_error(raw: flight.FlightClient, name: str, body: dict[str, Any]) -> str:
    with pytest.raises((flight.FlightError, pa.ArrowException)) as failed:
        raw_action(raw, name, body)
    return str(failed.value)


def test_redact_options_shows_safe_names_only() -> None:
    assert redact_options(OPTIONS) == SHOWN
    assert redact_options({}) == {}
    assert redact_options({"region": None, "anon": True, "profile": "prod"}) == {
        "region": None,
        "anon": True,
        "profile": "***",
    }


def test_redact_urls_hides_passwords_only() -> None:
    assert redact_urls("s3://AKIA:s3cr/t@bucket/x and http://u:p@h:9/y") == (
        "s3://AKIA:***@bucket/x and http://u:***@h:9/y"
    )
    assert redact_urls("https://u:p@ss@host/z") == "https://u:***@host/z"
    for untouched in ("http://user@host/x", "me@example.com", "file:///a:b/c@d"):
        assert redact_urls(untouched) == untouched


def test_storage_options_are_shown_back_only_for_safe_names(
    served: flight.FlightClient, catalog: Catalog, data_dir: Path
) -> None:
    dataset = lavender.create_dataset("options")
    created = lavender.create_shardset(
        dataset.id, data_dir.as_uri(), COLUMNS, storage_options=OPTIONS
    )
    assert created.storage_options == SHOWN
    assert lavender.get_shardset(dataset.id, created.id).storage_options == SHOWN
    answers = {
        "get_dataset": raw_action(served, "get_dataset", {"dataset_id": dataset.id}),
        "list_datasets": raw_action(served, "list_datasets", {}),
        "get_shardset": raw_action(
            served, "get_shardset", {"dataset_id": dataset.id, "shardset_id": created.id}
        ),
    }
    for name, answer in answers.items():
        assert [s for s in SECRETS if s in answer] == [], name
    assert "p4ss" not in repr(lavender.get_dataset(dataset.id))
    page = DatasetPage(client=lavender.get_client(), dataset_id=dataset.id)
    assert "p4ss" not in page.shardsets.to_csv() + str(page._shardsets.object)
    # the server keeps them, to open the location next time
    assert catalog.get_shardset(dataset.id, created.id).storage_options == OPTIONS


def test_a_password_in_a_location_url_is_hidden_everywhere(
    served: flight.FlightClient,
    open_service: LavenderService,
    web: Web,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="lavender_flight")
    location = web.url("shards", f"reader:{PASSWORD}")
    shown = web.url("shards", "reader:***")
    dataset = lavender.create_dataset("web")
    shardset = lavender.create_shardset(dataset.id, location, COLUMNS)
    assert shardset.location == shown
    assert [s.location for s in lavender.list_shards(dataset.id, shardset.id)] == [f"{shown}/a.csv"]
    pa_csv.write_csv(pa.table({"uid": [3], "text": ["c"]}), web.root / "shards" / "b.csv")
    (web.root / "shards" / "a.csv").unlink()
    with pytest.raises(ShardNotFound, match=r"shard file http://reader:\*\*\*@127.0.0.1:\d+/"):
        lavender.preview_dataset(dataset.id)
    synced = lavender.sync_shardset(dataset.id, shardset.id)
    assert ([s.location for s in synced.added], synced.removed) == (
        [f"{shown}/b.csv"],
        [f"{shown}/a.csv"],
    )
    with pytest.raises(InvalidArgument, match=r"no shard file at http://reader:\*\*\*@"):
        lavender.infer_columns(web.url("empty", f"reader:{PASSWORD}"))
    body = {"dataset_id": dataset.id, "shardset_id": shardset.id}
    answers = [
        raw_action(served, "get_dataset", {"dataset_id": dataset.id}),
        raw_action(served, "list_datasets", {}),
        raw_action(served, "get_shardset", body),
        raw_action(served, "list_shards", body),
        raw_action(served, "sync_shardset", body),
        raw_error(served, "infer_columns", {"location": web.url("none", f"u:{PASSWORD}")}),
    ]
    assert [a for a in answers if PASSWORD in a] == []
    client = lavender.get_client()
    pages = [
        DatasetPage(client=client, dataset_id=dataset.id).shardsets.to_csv(),
        ShardsetPage(client=client, dataset_id=dataset.id, shardset_id=shardset.id)._summary.object,
        ShardsetPage(client=client, dataset_id=dataset.id, shardset_id=shardset.id)._shards.object,
    ]
    assert [p for p in pages if PASSWORD in p] == [] and shown in pages[1]
    assert "synced http://reader:***@" in caplog.text
    assert PASSWORD not in caplog.text


def test_retries_and_errors_of_an_unreachable_url_hide_its_password(
    open_service: LavenderService, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = socket.socket()  # bound, never listening: connections to it are refused
    refusing.bind(("127.0.0.1", 0))
    location = f"http://reader:{PASSWORD}@127.0.0.1:{refusing.getsockname()[1]}/shards"
    dataset = catalog.create_dataset("gone", "uid")
    shardset = catalog.create_shardset(dataset.id, location, COLUMNS, True, [])
    shard = Shard(
        shardset_id=shardset.id,
        index=0,
        location=location + "/a.csv",
        format="csv",
        num_rows=1,
        size_bytes=10,
        created_at=0.0,
    )
    catalog.replace_shards(shardset.id, [shard])
    caplog.set_level(logging.DEBUG, logger="lavender_flight")
    with refusing, pytest.raises(StorageError) as failed:
        open_service.preview_dataset(dataset.id)
    assert "cannot read http://reader:***@127.0.0.1:" in str(failed.value)
    assert PASSWORD not in str(failed.value)
    assert "retrying in" in caplog.text and PASSWORD not in caplog.text
    with pytest.raises(InvalidLocation, match=r"location 'http://reader:\*\*\*@.*' is read-only"):
        open_service.write_shard(dataset.id, shardset.id, 1, pa.table({"uid": [1], "text": ["a"]}))


def test_shardset_records_redact_whenever_serialized() -> None:
    record = Shardset(
        id="ss-1",
        dataset_id="ds-1",
        location=f"s3://AKIA:{PASSWORD}@bucket/x",
        is_main=True,
        columns=[],
        created_at=0.0,
        storage_options={"secret": PASSWORD, "region": "eu"},
    )
    dumped = [record.model_dump_json(), json.dumps(record.model_dump(mode="json"))]
    assert [d for d in dumped if PASSWORD in d] == []
    assert record.model_dump()["storage_options"] == {"secret": "***", "region": "eu"}


def test_a_storage_library_quoting_a_hidden_option_is_scrubbed(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert hidden_values(OPTIONS) == {
        "p4ss-phrase", "auth-t0ken", "nested-p4ss", "http://me:proxy-p4ss@proxy", "AKIAKEY",
        "https://not-a-plain-value",
    }  # fmt: skip
    where = resolve_location(data_dir.as_uri(), OPTIONS, FAST)
    attempts: list[int] = []

    def quoting() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionResetError(104, "reset while sending auth-t0ken")
        raise PermissionError("p4ss-phrase is not the passphrase of AKIAKEY")

    caplog.set_level(logging.WARNING, logger="lavender_flight")
    with pytest.raises(StorageError) as failed:
        where.call(quoting, f"cannot read {where.url}")
    assert str(failed.value).endswith("PermissionError: *** is not the passphrase of ***")
    assert "reset while sending ***; retrying" in caplog.text
    assert [s for s in SECRETS if s in caplog.text + str(failed.value)] == []
