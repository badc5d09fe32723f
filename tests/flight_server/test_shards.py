from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lavender_flight.flight_server.shards import (
    declared_schema,
    format_of,
    read_shard,
    read_shard_schema,
    shard_file_name,
    shard_index_of,
    shard_stats,
    write_shard,
)
from lavender_flight.flight_server.storage import resolve_location
from lavender_flight.protocol.errors import InvalidArgument, InvalidLocation, SchemaMismatch

SCHEMA = declared_schema([("uid", "int"), ("text", "str"), ("score", "float32")])
TABLE = pa.table(
    {
        "uid": pa.array([3, 1, 2], pa.int64()),
        "text": ["c", "a", None],
        "score": pa.array([0.5, 1.5, 2.5], pa.float32()),
    }
)


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "csv", "jsonl"])
def test_write_then_read_each_format(data_dir: Path, fmt: str) -> None:
    location = resolve_location(data_dir.as_uri())
    path = location.child(shard_file_name(0, fmt))
    size = write_shard(location, path, TABLE, fmt)
    assert size == (data_dir / Path(path).name).stat().st_size > 0
    assert format_of(path) == fmt and shard_index_of(path) == 0
    back = read_shard(location, path, fmt, SCHEMA)
    assert back.schema.equals(SCHEMA)
    assert back.to_pylist() == TABLE.to_pylist()
    # projection reads only the columns asked for
    assert read_shard(location, path, fmt, SCHEMA, ["uid"]).column_names == ["uid"]
    assert not list(data_dir.glob("*.tmp-writing"))


def test_csv_columns_come_back_typed(data_dir: Path) -> None:
    """CSV carries no types: the declared ones are used (the seed returned strings)."""
    (data_dir / "a.csv").write_text("uid,text,score\n1,10,0.25\n2,20,0.75\n")
    location = resolve_location(data_dir.as_uri())
    table = read_shard(location, location.child("a.csv"), "csv", SCHEMA)
    assert table.to_pylist() == [
        {"uid": 1, "text": "10", "score": 0.25},
        {"uid": 2, "text": "20", "score": 0.75},
    ]


def test_mismatch_names_file_and_column(data_dir: Path) -> None:
    pq.write_table(pa.table({"uid": [1], "text": [5], "score": [1.0]}), data_dir / "bad.parquet")
    location = resolve_location(data_dir.as_uri())
    with pytest.raises(SchemaMismatch, match=r"bad\.parquet.*'text' is int64, declared string"):
        read_shard(location, location.child("bad.parquet"), "parquet", SCHEMA)
    pq.write_table(pa.table({"uid": [1]}), data_dir / "short.parquet")
    with pytest.raises(SchemaMismatch, match=r"short\.parquet.*text"):
        read_shard(location, location.child("short.parquet"), "parquet", SCHEMA)
    (data_dir / "bad.csv").write_text("uid,text,score\nx,a,1\n")
    with pytest.raises(SchemaMismatch, match=r"bad\.csv.*uid"):
        read_shard(location, location.child("bad.csv"), "csv", SCHEMA)


def test_schema_of_each_format(data_dir: Path) -> None:
    location = resolve_location(data_dir.as_uri())
    for fmt in ["parquet", "arrow"]:
        path = location.child(shard_file_name(1, fmt))
        write_shard(location, path, TABLE, fmt)
        assert read_shard_schema(location, path, fmt).equals(TABLE.schema)


def test_formats_that_cannot_hold_a_column(data_dir: Path) -> None:
    location = resolve_location(data_dir.as_uri())
    table = pa.table({"uid": [1], "blob": [b"\x00\x01"]})
    with pytest.raises(InvalidArgument, match="JSON lines cannot hold binary column 'blob'"):
        write_shard(location, location.child("x.jsonl"), table, "jsonl")
    nested = pa.table({"uid": [1], "v": [[1.0, 2.0]]})
    with pytest.raises(InvalidArgument, match="use format='parquet'"):
        write_shard(location, location.child("x.csv"), nested, "csv")
    assert sorted(p.name for p in data_dir.iterdir()) == []


def test_shard_stats() -> None:
    stats = shard_stats(TABLE, "uid")
    assert (stats.num_rows, stats.uid_min, stats.uid_max) == (3, 1, 3)
    strings = shard_stats(pa.table({"id": ["b", "a"]}), "id")
    assert (strings.uid_min, strings.uid_max) == ("a", "b")
    with pytest.raises(SchemaMismatch, match="null"):
        shard_stats(pa.table({"uid": [1, None]}), "uid")
    with pytest.raises(SchemaMismatch, match="integer or string"):
        shard_stats(pa.table({"uid": [1.5]}), "uid")


def test_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = resolve_location("file://cache/shards")
    assert relative.url == (tmp_path / "cache" / "shards").as_uri()
    assert resolve_location(str(tmp_path)).url == tmp_path.as_uri()
    assert resolve_location("memory://bucket/x").url == "memory:///bucket/x"
    (tmp_path / "f.parquet").write_bytes(b"x")
    with pytest.raises(InvalidLocation, match="names a file"):
        resolve_location((tmp_path / "f.parquet").as_uri())
    with pytest.raises(InvalidLocation, match="unknown protocol 'nope'"):
        resolve_location("nope://x/y")
    with pytest.raises(InvalidLocation, match="required"):
        resolve_location("  ")


def test_memory_location_round_trip() -> None:
    location = resolve_location("memory://lf-test/shards")
    path = location.child(shard_file_name(3, "parquet"))
    write_shard(location, path, TABLE, "parquet")
    assert [f.name for f in location.list_files()] == ["shard.00000003.parquet"]
    assert read_shard(location, path, "parquet", SCHEMA).num_rows == 3
    location.fs.rm(location.path, recursive=True)
