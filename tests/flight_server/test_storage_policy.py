"""Storage locations by allowlist: the protocols, URLs and options the server refuses to open.

fsspec's wrapper protocols reach the local disk through their storage options whatever the
storage roots say; each attack here was reproduced against the server before the allowlist
(``reference://`` with ``fo`` refs, ``zip``/``tar`` with ``fo``, ``dir`` with ``path``, the
caching wrappers over ``file``, a Writer through a ``dir://`` shardset) and is now refused.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import Writer
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.policy import OBJECT_STORES, StoragePolicy
from lavender_flight.flight_server.settings import ServerSettings
from lavender_flight.flight_server.storage import (
    DEFAULT_RETRY,
    Location,
    RetryPolicy,
    resolve_location,
)
from lavender_flight.protocol import ColumnOptions, Dataset
from lavender_flight.protocol.errors import InvalidLocation
from tests.conftest import CALL_TIMEOUT
from tests.flight_server.conftest import Web

COLUMNS = [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="text", type_="str")]
SECRET_LINE = "the-content-of-a-private-file"
DEFAULT_ALLOWED = {"file", "local", *OBJECT_STORES}


class RecordingResolver:
    """Resolves locations as the server does, and remembers each URL it was asked to open."""

    def __init__(self) -> None:
        self.opened: list[str] = []

    def __call__(self, url: str, options: Mapping[str, Any], retry: RetryPolicy) -> Location:
        self.opened.append(url)
        return resolve_location(url, options, retry)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A private folder outside the storage roots, with a CSV shard and archives of it."""
    folder = tmp_path / "outside"
    folder.mkdir()
    pa_csv.write_csv(pa.table({"uid": [1, 2], "text": [SECRET_LINE, "x"]}), folder / "leak.csv")
    with zipfile.ZipFile(folder / "x.zip", "w") as archive:
        archive.write(folder / "leak.csv", "leak.csv")
    import tarfile

    with tarfile.open(folder / "x.tar", "w") as archive:
        archive.add(folder / "leak.csv", "leak.csv")
    return folder


@pytest.fixture
def resolver() -> RecordingResolver:
    return RecordingResolver()


@pytest.fixture
def guarded(catalog: Catalog, tmp_path: Path, resolver: RecordingResolver) -> LavenderService:
    """A service as ``serve`` builds it: storage root ``tmp_path/root``, default protocols."""
    (tmp_path / "root").mkdir()
    return LavenderService(catalog, resolve=resolver, storage_roots=[tmp_path / "root"])


def attacks(outside: Path) -> dict[str, tuple[str, dict[str, Any] | None]]:
    """Each wrapper-protocol attack: the location and storage options that read ``outside``."""
    leak = str(outside / "leak.csv")
    return {
        "reference": ("reference://", {"fo": {"version": 1, "refs": {"leak.csv": [leak]}}}),
        "zip": ("zip://", {"fo": str(outside / "x.zip")}),
        "tar": ("tar://", {"fo": str(outside / "x.tar")}),
        "dir": ("dir://", {"path": str(outside)}),
        "simplecache": (f"simplecache::file://{outside}", None),
        "filecache": (f"filecache://{outside}", {"target_protocol": "file"}),
        "blockcache": (f"blockcache://{outside}", {"target_protocol": "file"}),
    }


ATTACKS = ["reference", "zip", "tar", "dir", "simplecache", "filecache", "blockcache"]


# -- every protocol -------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", sorted(fsspec.available_protocols()))
def test_every_fsspec_protocol_is_refused_unless_allowed(
    guarded: LavenderService,
    catalog: Catalog,
    resolver: RecordingResolver,
    tmp_path: Path,
    protocol: str,
) -> None:
    url = f"{protocol}://some-bucket/some/folder"
    if protocol in DEFAULT_ALLOWED:
        inside = f"{protocol}://{tmp_path / 'root'}" if protocol in ("file", "local") else url
        guarded.policy.check(inside)  # allowed (file: under the roots)
        return
    dataset = guarded.create_dataset(f"ds-{protocol}")
    with pytest.raises(InvalidLocation) as refused:
        guarded.create_shardset(dataset.id, url, COLUMNS)
    text = str(refused.value)
    assert f"protocol {protocol!r} of location {url!r} is not allowed: this server opens " in text
    assert "file:// under the storage roots, abfs, abfss, az, gcs, gs, s3, s3a;" in text
    assert ("--allow-memory" if protocol == "memory" else "--allow-protocol NAME") in text
    with pytest.raises(InvalidLocation, match="is not allowed"):
        guarded.infer_columns(url)
    assert resolver.opened == []  # refused before any filesystem was built
    assert catalog.get_dataset(dataset_id=dataset.id).shardsets == []
    # the operator may allow it, by name
    allowing = LavenderService(catalog, allow_protocols=[protocol])
    allowing.policy.check(url)
    assert protocol in allowing.policy.protocols


def test_an_unknown_protocol_is_named_as_such(guarded: LavenderService) -> None:
    dataset = guarded.create_dataset("unknown")
    with pytest.raises(InvalidLocation, match=r"unknown protocol 'nope' in location 'nope://x'"):
        guarded.create_shardset(dataset.id, "nope://x", COLUMNS)


def test_memory_is_refused_unless_turned_on(catalog: Catalog) -> None:
    refusing = LavenderService(catalog)
    dataset = refusing.create_dataset("in-ram")
    with pytest.raises(InvalidLocation, match=r"start the server with --allow-memory"):
        refusing.create_shardset(dataset.id, "memory://lf-policy/x", COLUMNS)
    allowing = LavenderService(catalog, allow_memory=True)
    shardset = allowing.create_shardset(dataset.id, "memory://lf-policy/x", COLUMNS)
    allowing.write_shard(dataset.id, shardset.id, 0, pa.table({"uid": [1], "text": ["a"]}))
    try:
        assert allowing.preview_dataset(dataset.id).to_pylist() == [{"uid": 1, "text": "a"}]
        with pytest.raises(InvalidLocation, match="--allow-memory"):
            refusing.preview_dataset(dataset.id)  # recorded, then refused on read
    finally:
        fsspec.filesystem("memory").rm("/lf-policy", recursive=True)


# -- the attacks ----------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ATTACKS)
def test_wrapper_protocol_attacks_are_refused(
    guarded: LavenderService,
    catalog: Catalog,
    resolver: RecordingResolver,
    outside: Path,
    attack: str,
) -> None:
    location, options = attacks(outside)[attack]
    dataset = guarded.create_dataset(f"attack-{attack}")
    with pytest.raises(InvalidLocation) as refused:
        guarded.create_shardset(dataset.id, location, storage_options=options)
    assert SECRET_LINE not in str(refused.value)
    assert "--allow-protocol NAME" in str(refused.value) or "chains protocols" in str(refused.value)
    assert resolver.opened == []
    assert catalog.get_dataset(dataset_id=dataset.id).shardsets == []


@pytest.mark.parametrize("attack", ATTACKS)
def test_allowing_a_wrapper_protocol_still_refuses_what_reaches_the_disk(
    catalog: Catalog, tmp_path: Path, outside: Path, attack: str
) -> None:
    (tmp_path / "root").mkdir()
    location, options = attacks(outside)[attack]
    reckless = LavenderService(catalog, storage_roots=[tmp_path / "root"], allow_protocols=ATTACKS)
    dataset = reckless.create_dataset(f"allowed-{attack}")
    with pytest.raises(InvalidLocation) as refused:
        reckless.create_shardset(dataset.id, location, storage_options=options)
    expected = {
        "simplecache": "chains protocols ('::')",
        "filecache": "storage option 'target_protocol' is refused",
        "blockcache": "storage option 'target_protocol' is refused",
        "dir": "storage option 'path' is refused",
    }.get(attack, "storage option 'fo' is refused")
    assert expected in str(refused.value)
    if str(outside) not in location:  # the option is named, never its value
        assert str(outside) not in str(refused.value)


def recorded_as_before(
    catalog: Catalog, outside: Path, attack: str
) -> tuple[Dataset, str, dict[str, Any] | None]:
    """A dataset whose shardset an older, open server registered at the attack location."""
    location, options = attacks(outside)[attack]
    dataset = catalog.create_dataset(f"old-{attack}", "uid")
    shardset = catalog.create_shardset(
        dataset.id, location, COLUMNS, True, [], storage_options=options
    )
    return catalog.get_dataset(dataset_id=dataset.id), shardset.id, options


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_shardset_recorded_at_a_refused_location_is_refused_on_every_use(
    guarded: LavenderService,
    catalog: Catalog,
    resolver: RecordingResolver,
    outside: Path,
    attack: str,
) -> None:
    dataset, shardset_id, _ = recorded_as_before(catalog, outside, attack)
    uses = {
        "preview": lambda: guarded.preview_dataset(dataset.id),
        "reader": lambda: guarded.reader(dataset),
        "sync": lambda: guarded.sync_shardset(dataset.id, shardset_id),
        "write": lambda: guarded.write_shard(
            dataset.id, shardset_id, 0, pa.table({"uid": [1], "text": ["a"]})
        ),
    }
    for name, use in uses.items():
        with pytest.raises(InvalidLocation):
            use()
            pytest.fail(f"{name} was allowed")
    assert resolver.opened == []
    assert catalog.list_shards(shardset_id) == []


def test_writer_through_a_dir_shardset_writes_nothing_outside(
    guarded: LavenderService, catalog: Catalog, outside: Path, reset_client: None
) -> None:
    dataset, shardset_id, _ = recorded_as_before(catalog, outside, "dir")
    before = sorted(p.name for p in outside.iterdir())
    server = LavenderFlightServer(guarded, "grpc://127.0.0.1:0")
    try:
        lavender.init(f"grpc://127.0.0.1:{server.port}", timeout=CALL_TIMEOUT)
        writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset_id)
        with pytest.raises(InvalidLocation, match=r"protocol 'dir' of location 'dir://' is not"):
            writer.write([{"uid": 1, "text": "planted"}], shard_index=0)
        with pytest.raises(InvalidLocation, match="is not allowed"):
            lavender.preview_dataset(dataset.id)
    finally:
        server.shutdown()
    assert sorted(p.name for p in outside.iterdir()) == before  # no shard planted there
    assert catalog.list_shards(shardset_id) == []


def test_the_attacks_over_the_wire_get_one_clear_line(
    guarded: LavenderService, outside: Path, reset_client: None
) -> None:
    server = LavenderFlightServer(guarded, "grpc://127.0.0.1:0")
    try:
        lavender.init(f"grpc://127.0.0.1:{server.port}", timeout=CALL_TIMEOUT)
        dataset = lavender.create_dataset("wire")
        location, options = attacks(outside)["reference"]
        with pytest.raises(InvalidLocation) as refused:
            lavender.create_shardset(dataset.id, location, storage_options=options)
        assert str(refused.value) == (
            "protocol 'reference' of location 'reference://' is not allowed: this server "
            "opens file:// under the storage roots, abfs, abfss, az, gcs, gs, s3, s3a; start "
            "the server with --allow-protocol NAME to allow another one (dangerous: wrapper "
            "protocols such as reference, zip, tar, dir and the caching ones read any file "
            "of the server)"
        )
        with pytest.raises(InvalidLocation, match="chains protocols"):
            lavender.infer_columns(f"simplecache::file://{outside}")
        assert lavender.get_dataset(dataset.id).shardsets == []
    finally:
        server.shutdown()


# -- storage options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        ({"fo": "x"}, "storage option 'fo'"),
        (
            {"client_kwargs": {"target_options": {}}},
            "storage option 'client_kwargs.target_options'",
        ),
        ({"FS": "file"}, "storage option 'FS'"),
        ({"cache-storage": "/tmp"}, "storage option 'cache-storage'"),
        ({"token": "{home}/creds.json"}, "its value is a path on the server's disk"),
        (
            {"client_kwargs": {"verify": "{home}"}},
            "'client_kwargs.verify' is refused: its value is a path",
        ),
        (
            {"endpoint_url": "file:///etc"},
            "'endpoint_url' is refused: its value names another protocol",
        ),
        ({"headers": [{"x": "simplecache::s3://b"}]}, "'headers[0].x' is refused: its value names"),
    ],
)
def test_options_naming_a_path_or_another_protocol_are_refused(
    guarded: LavenderService, tmp_path: Path, options: dict[str, Any], refused: str
) -> None:
    (tmp_path / "creds.json").write_text("{}")
    filled = eval_home(options, str(tmp_path))
    dataset = guarded.create_dataset("options")
    with pytest.raises(InvalidLocation, match=r"^" + _escape(refused)):
        guarded.create_shardset(dataset.id, "s3://bucket/x", COLUMNS, storage_options=filled)


def eval_home(value: Any, home: str) -> Any:
    if isinstance(value, dict):
        return {k: eval_home(v, home) for k, v in value.items()}
    if isinstance(value, list):
        return [eval_home(v, home) for v in value]
    return value.replace("{home}", home) if isinstance(value, str) else value


def _escape(text: str) -> str:
    return ".*" + re.escape(text)


def test_options_of_object_stores_are_accepted() -> None:
    StoragePolicy().check(
        "s3://bucket/x",
        {
            "key": "AKIA...",
            "secret": "/starts/with/a/slash+and/is/no/path",  # AWS secrets may
            "endpoint_url": "https://s3.example.com",
            "client_kwargs": {"region_name": "eu-west-1", "verify": False},
            "s3_additional_kwargs": {"SSEKMSKeyId": "arn:aws:kms:eu-west-1:1:key/abc"},
            "config_kwargs": {"retries": {"max_attempts": 3}},
        },
    )
    StoragePolicy().check("gs://bucket/x", {"token": "anon", "project": "p"})


# -- read-only web locations -----------------------------------------------------------------


def test_http_is_read_only_when_allowed(catalog: Catalog, web: Web) -> None:
    fast = RetryPolicy(attempts=1)
    refusing = LavenderService(catalog, retry=fast)
    dataset = refusing.create_dataset("web")
    with pytest.raises(InvalidLocation, match="protocol 'http' .* is not allowed"):
        refusing.create_shardset(dataset.id, web.url("shards"), COLUMNS)
    allowing = LavenderService(catalog, retry=fast, allow_protocols=["http"])
    shardset = allowing.create_shardset(dataset.id, web.url("shards"), COLUMNS)
    assert shardset.total_samples == 2
    assert allowing.preview_dataset(dataset.id).to_pylist() == [
        {"uid": 1, "text": "a"},
        {"uid": 2, "text": "b"},
    ]
    with pytest.raises(InvalidLocation, match=r"is read-only \(http is never written through\)"):
        allowing.write_shard(dataset.id, shardset.id, 1, pa.table({"uid": [3], "text": ["c"]}))
    assert DEFAULT_RETRY.attempts > 1  # (the fast policy only spares the test a wait)


# -- settings -------------------------------------------------------------------------------


def test_allow_protocol_and_memory_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings(allow_protocol=["sftp,ftp", " http "]).allow_protocol == [
        "sftp",
        "ftp",
        "http",
    ]
    monkeypatch.setenv("LAVENDER_FLIGHT_ALLOW_PROTOCOL", "webdav, ftp")
    monkeypatch.setenv("LAVENDER_FLIGHT_ALLOW_MEMORY", "true")
    settings = ServerSettings()
    assert (settings.allow_protocol, settings.allow_memory) == (["webdav", "ftp"], True)
    assert "DANGEROUS" in (ServerSettings.model_fields["allow_protocol"].description or "")
    policy = StoragePolicy.build(None, settings.allow_protocol, settings.allow_memory)
    assert policy.protocols == (
        "file", "abfs", "abfss", "az", "ftp", "gcs", "gs", "memory", "s3", "s3a", "webdav",
    )  # fmt: skip
