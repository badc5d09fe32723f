from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from lavender_flight.flight_server import LavenderService
from lavender_flight.protocol import ColumnOptions
from lavender_flight.protocol.errors import InvalidArgument, SchemaMismatch, ShardAlreadyExists


def rows(start: int, stop: int) -> pa.Table:
    uids = list(range(start, stop))
    return pa.table({"uid": pa.array(uids, pa.int64()), "text": [f"t{u}" for u in uids]})


def test_columns_inferred_from_first_shard(service: LavenderService, data_dir: Path) -> None:
    pq.write_table(
        pa.table({"uid": [1, 2], "emb": pa.array([[1.0], [2.0]], pa.list_(pa.float32()))}),
        data_dir / "a.parquet",
    )
    ds = service.create_dataset("d")
    ss = service.create_shardset(ds.id, data_dir.as_uri())
    assert [(c.name, c.type_) for c in ss.columns] == [
        ("uid", "int64"),
        ("emb", "list<item: float32>"),
    ]
    assert (ss.shard_count, ss.total_samples) == (1, 2)


def test_inference_needs_a_shard(service: LavenderService, data_dir: Path) -> None:
    ds = service.create_dataset("d")
    with pytest.raises(InvalidArgument, match="no shard file .* pass columns="):
        service.create_shardset(ds.id, data_dir.as_uri())
    assert service.get_dataset(dataset_id=ds.id).shardsets == []


def test_sync_adds_updates_and_removes(service: LavenderService, data_dir: Path) -> None:
    ds = service.create_dataset("d")
    ss = service.create_shardset(
        ds.id,
        data_dir.as_uri(),
        [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="text", type_="str")],
    )
    assert ss.shard_count == 0
    pq.write_table(rows(0, 10), data_dir / "shard.00000000.parquet")
    pq.write_table(rows(10, 15), data_dir / "extra-b.parquet")
    pa_csv.write_csv(rows(15, 18), data_dir / "extra-a.csv")
    (data_dir / "README.txt").write_text("not a shard")
    result = service.sync_shardset(ds.id, ss.id)
    # files named shard.N keep N; the others take the next free indices in name order
    assert sorted((s.index, Path(s.location).name) for s in result.added) == [
        (0, "shard.00000000.parquet"),
        (1, "extra-a.csv"),
        (2, "extra-b.parquet"),
    ]
    assert (result.shard_count, result.total_samples) == (3, 18)
    by_name = {Path(s.location).name: s for s in service.list_shards(ds.id, ss.id)}
    assert (by_name["extra-b.parquet"].uid_min, by_name["extra-b.parquet"].uid_max) == (10, 14)
    assert by_name["extra-a.csv"].format == "csv"

    again = service.sync_shardset(ds.id, ss.id)
    assert (again.added, again.updated, again.removed) == ([], [], [])

    pq.write_table(rows(10, 30), data_dir / "extra-b.parquet")  # grew
    (data_dir / "extra-a.csv").unlink()
    changed = service.sync_shardset(ds.id, ss.id)
    assert [(s.index, s.num_rows) for s in changed.updated] == [(2, 20)]
    assert [Path(u).name for u in changed.removed] == ["extra-a.csv"]
    assert changed.total_samples == 30
    assert service.preview_dataset(ds.id, 0, 100).column("uid").to_pylist() == list(range(30))


def test_bad_file_fails_whole_sync(service: LavenderService, data_dir: Path) -> None:
    ds = service.create_dataset("d")
    ss = service.create_shardset(
        ds.id,
        data_dir.as_uri(),
        [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="text", type_="str")],
    )
    pq.write_table(rows(0, 5), data_dir / "a.parquet")
    pq.write_table(pa.table({"uid": [9], "text": [1.5]}), data_dir / "b.parquet")
    with pytest.raises(
        SchemaMismatch, match=r"b\.parquet: column 'text' is double, declared string"
    ):
        service.sync_shardset(ds.id, ss.id)
    assert service.list_shards(ds.id, ss.id) == []


def test_write_shard_through_service(service: LavenderService, data_dir: Path) -> None:
    ds = service.create_dataset("d")
    target = data_dir / "not-yet"  # Writer creates a location that does not exist yet
    ss = service.create_shardset(
        ds.id,
        target.as_uri(),
        [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="text", type_="str")],
    )
    shard = service.write_shard(ds.id, ss.id, 0, rows(0, 4))
    assert (shard.num_rows, shard.uid_min, shard.uid_max) == (4, 0, 3)
    assert (target / "shard.00000000.parquet").exists()
    with pytest.raises(ShardAlreadyExists, match="overwrite=True"):
        service.write_shard(ds.id, ss.id, 0, rows(0, 2))
    replaced = service.write_shard(ds.id, ss.id, 0, rows(5, 7), "csv", overwrite=True)
    assert replaced.format == "csv"
    assert sorted(p.name for p in target.iterdir()) == ["shard.00000000.csv"]
    with pytest.raises(SchemaMismatch, match="'extra' .* not declared"):
        service.write_shard(ds.id, ss.id, 1, rows(0, 1).append_column("extra", pa.array([1])))
    with pytest.raises(SchemaMismatch, match="'text' is int64, declared string"):
        service.write_shard(ds.id, ss.id, 1, pa.table({"uid": [1], "text": [2]}))
    assert [s.index for s in service.list_shards(ds.id, ss.id)] == [0]


def test_preview_joins_and_pages(service: LavenderService, data_dir: Path) -> None:
    ds = service.create_dataset("d")
    main = service.create_shardset(
        ds.id,
        (data_dir / "m").as_uri(),
        [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="text", type_="str")],
    )
    feat = service.create_shardset(
        ds.id,
        (data_dir / "f").as_uri(),
        [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="n", type_="int32")],
    )
    for i in range(3):
        service.write_shard(ds.id, main.id, i, rows(i * 10, i * 10 + 10))
    # features: other shard boundaries, reversed order, uid 5 missing
    uids = [u for u in range(29, -1, -1) if u != 5]
    half = len(uids) // 2
    for i, part in enumerate([uids[:half], uids[half:]]):
        service.write_shard(
            ds.id,
            feat.id,
            i,
            pa.table(
                {
                    "uid": pa.array(part, pa.int64()),
                    "n": pa.array([u * 2 for u in part], pa.int32()),
                }
            ),
        )
    page = service.preview_dataset(ds.id, offset=4, limit=8)
    assert page.column_names == ["uid", "text", "n"]
    assert page.column("uid").to_pylist() == list(range(4, 12))
    assert page.column("n").to_pylist() == [8, None, 12, 14, 16, 18, 20, 22]
    only = service.preview_dataset(ds.id, offset=28, limit=10, columns=["text"])
    assert only.to_pylist() == [{"uid": 28, "text": "t28"}, {"uid": 29, "text": "t29"}]
    with pytest.raises(InvalidArgument, match="unknown column.*'nope'.*columns: uid, text, n"):
        service.preview_dataset(ds.id, columns=["nope"])
    with pytest.raises(InvalidArgument, match="limit"):
        service.preview_dataset(ds.id, limit=10**6)


def test_written_tables_may_use_other_number_widths(
    service: LavenderService, data_dir: Path
) -> None:
    ds = service.create_dataset("d")
    ss = service.create_shardset(
        ds.id,
        data_dir.as_uri(),
        [ColumnOptions(name="uid", type_="int32"), ColumnOptions(name="w", type_="float32")],
    )
    table = pa.table({"uid": pa.array([1, 2], pa.int64()), "w": pa.array([0.5, 1.5], pa.float64())})
    service.write_shard(ds.id, ss.id, 0, table)
    back = service.preview_dataset(ds.id)
    assert back.schema.types == [pa.int32(), pa.float32()]
    assert back.to_pylist() == [{"uid": 1, "w": 0.5}, {"uid": 2, "w": 1.5}]
    too_big = pa.table({"uid": pa.array([2**40], pa.int64()), "w": pa.array([1.0])})
    with pytest.raises(SchemaMismatch, match="not in range"):
        service.write_shard(ds.id, ss.id, 1, too_big)


def test_infer_columns_before_creating(service: LavenderService, data_dir: Path) -> None:
    pq.write_table(
        pa.table({"uid": [1], "t": ["x"], "v": pa.array([1.5], pa.float32())}),
        data_dir / "a.parquet",
    )
    columns = service.infer_columns(data_dir.as_uri())
    assert [(c.name, c.type_) for c in columns] == [
        ("uid", "int64"),
        ("t", "string"),
        ("v", "float32"),
    ]
    with pytest.raises(InvalidArgument, match="no shard file"):
        service.infer_columns((data_dir / "empty").as_uri())
