"""The wire is plain Flight: what any pyarrow.flight user sees."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from lavender_flight.client import Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.protocol.errors import InvalidArgument
from tests.conftest import call_options

COLUMNS = [
    lavender.DatasetColumnOptions(name="uid", type_="int", description="id"),
    lavender.DatasetColumnOptions(name="text", type_="str"),
    lavender.DatasetColumnOptions(name="score", type_="float32"),
]


def samples(start: int, stop: int) -> list[dict[str, object]]:
    return [{"uid": u, "text": f"sample {u}", "score": u / 4} for u in range(start, stop)]


def read_all_over_flight(raw: flight.FlightClient, name: str) -> tuple[flight.FlightInfo, pa.Table]:
    infos = {
        info.descriptor.path[0].decode(): info for info in raw.list_flights(options=call_options())
    }
    listed = infos[name]
    info = raw.get_flight_info(flight.FlightDescriptor.for_path(name), call_options())
    assert info.schema.equals(listed.schema)
    tables = [raw.do_get(ep.ticket, call_options()).read_all() for ep in info.endpoints]
    return info, pa.concat_tables(tables)


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "csv", "jsonl"])
def test_writer_each_format_read_back_over_raw_flight(
    client: LavenderClient, raw_flight: flight.FlightClient, data_dir: Path, fmt: str
) -> None:
    dataset = lavender.create_dataset(name=f"ds-{fmt}", uid_column_name="uid")
    shardset = lavender.create_shardset(
        dataset_id=dataset.id, location=(data_dir / fmt).as_uri(), columns=COLUMNS
    )
    writer = Writer.get(format=fmt, dataset_id=dataset.id, shardset_id=shardset.id)
    written = []
    for index, (start, stop) in enumerate([(0, 100), (100, 250), (250, 260)]):
        shard = writer.write(samples=samples(start, stop), shard_index=index)
        assert (shard.num_rows, shard.uid_min, shard.uid_max) == (stop - start, start, stop - 1)
        written.extend(samples(start, stop))
    # a fresh sync finds exactly what Writer registered
    synced = lavender.sync_shardset(dataset.id, shardset.id)
    assert (synced.added, synced.removed, synced.shard_count, synced.total_samples) == (
        [],
        [],
        3,
        260,
    )

    info, table = read_all_over_flight(raw_flight, f"ds-{fmt}")
    assert info.total_records == 260 and len(info.endpoints) == 3
    assert info.schema == pa.schema(
        [("uid", pa.int64()), ("text", pa.string()), ("score", pa.float32())]
    )
    assert table.to_pylist() == written


def test_joined_rows_over_raw_flight(
    client: LavenderClient, raw_flight: flight.FlightClient, data_dir: Path
) -> None:
    dataset = lavender.create_dataset(name="joined")
    main = lavender.create_shardset(dataset.id, (data_dir / "m").as_uri(), COLUMNS[:2])
    feat = lavender.create_shardset(
        dataset.id,
        (data_dir / "f").as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="len", type_="int32"),
        ],
    )
    Writer.get(dataset_id=dataset.id, shardset_id=main.id).write(
        [{"uid": u, "text": "x" * u} for u in range(20)]
    )
    Writer.get(dataset_id=dataset.id, shardset_id=feat.id).write(
        [{"uid": u, "len": u} for u in reversed(range(0, 20, 2))]
    )
    _, table = read_all_over_flight(raw_flight, "joined")
    assert table.column_names == ["uid", "text", "len"]
    assert table.column("len").to_pylist() == [u if u % 2 == 0 else None for u in range(20)]
    # a path naming shardsets reads only those (the main one always decides the rows)
    info = raw_flight.get_flight_info(
        flight.FlightDescriptor.for_path("joined", main.id), call_options()
    )
    assert info.schema.names == ["uid", "text"]
    assert lavender.read_dataset(dataset.id).num_rows == 20  # the path may name the id too


def test_do_put_with_a_plain_path_descriptor(
    client: LavenderClient, raw_flight: flight.FlightClient, data_dir: Path
) -> None:
    dataset = lavender.create_dataset(name="put")
    shardset = lavender.create_shardset(dataset.id, data_dir.as_uri(), COLUMNS)
    table = pa.table(
        {"uid": pa.array([7, 8]), "text": ["a", "b"], "score": pa.array([1.0, 2.0], pa.float32())}
    )
    descriptor = flight.FlightDescriptor.for_path(dataset.id, shardset.id, "4", "arrow")
    writer, answers = raw_flight.do_put(descriptor, table.schema, call_options())
    writer.write_table(table)
    writer.done_writing()
    shard = json.loads(answers.read().to_pybytes())
    writer.close()
    assert (shard["index"], shard["format"], shard["num_rows"]) == (4, "arrow", 2)
    assert (data_dir / "shard.00000004.arrow").exists()
    assert lavender.preview_dataset(dataset.id).to_pylist() == table.to_pylist()


def test_list_actions_describes_each(
    client: LavenderClient, raw_flight: flight.FlightClient
) -> None:
    actions = dict((a.type, a.description) for a in raw_flight.list_actions(call_options()))
    for name in [
        "create_dataset",
        "get_dataset",
        "list_datasets",
        "delete_dataset",
        "create_shardset",
        "get_shardset",
        "delete_shardset",
        "sync_shardset",
        "preview_dataset",
        "list_shards",
    ]:
        assert actions[name]
    assert dict(lavender.list_actions()) == actions


def test_list_flights_empty_and_shardless(
    client: LavenderClient, raw_flight: flight.FlightClient
) -> None:
    assert list(raw_flight.list_flights(options=call_options())) == []
    lavender.create_dataset("empty")
    (info,) = list(raw_flight.list_flights(options=call_options()))
    assert (info.descriptor.path, info.total_records, info.endpoints) == ([b"empty"], 0, [])


def test_walkthrough_of_the_readme(
    client: LavenderClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed's walk-through, with a relative file:// location and CSV shards."""
    monkeypatch.chdir(tmp_path)  # the server runs in-process: relative paths are its cwd's
    dataset = lavender.create_dataset(name="my-dataset", uid_column_name="uid")
    shardset = lavender.create_shardset(
        dataset_id=dataset.id,
        location="file://.cache/lavender-flight/my_shards",
        columns=[
            lavender.DatasetColumnOptions(name="uid", description="Unique identifier", type_="int"),
            lavender.DatasetColumnOptions(name="text", description="Text content", type_="str"),
        ],
    )
    writer = Writer.get(format="csv", dataset_id=dataset.id, shardset_id=shardset.id)
    writer.write(samples=[{"uid": i, "text": f"Sample {i}"} for i in range(100)], shard_index=0)
    assert (tmp_path / ".cache/lavender-flight/my_shards/shard.00000000.csv").exists()
    got = lavender.get_dataset(name="my-dataset")
    assert (got.id, got.uid_column_name, got.total_samples) == (dataset.id, "uid", 100)
    assert [c.description for c in got.shardsets[0].columns] == [
        "Unique identifier",
        "Text content",
    ]
    preview = lavender.preview_dataset(dataset.id, offset=98, limit=10)
    assert preview.to_pylist() == [
        {"uid": 98, "text": "Sample 98"},
        {"uid": 99, "text": "Sample 99"},
    ]
    assert [d.name for d in lavender.list_datasets()] == ["my-dataset"]
    lavender.delete_dataset(dataset.id)
    assert lavender.list_datasets() == []


def test_a_dataset_without_shardsets_says_it_has_nothing_to_read(client: LavenderClient) -> None:
    dataset = lavender.create_dataset(name="nothing-yet")
    for read in (
        lambda: lavender.preview_dataset(dataset.id),
        lambda: lavender.read_dataset("nothing-yet"),
        lambda: lavender.read_shard(dataset.id, 0),
    ):
        with pytest.raises(InvalidArgument, match="has no shardset yet.*create_shardset"):
            read()
