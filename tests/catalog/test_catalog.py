from __future__ import annotations

import re
import threading
import time

import adbc_driver_manager
import pyarrow as pa
import pytest

from lavender_flight.catalog import SCHEMA_VERSION, Catalog, open_catalog
from lavender_flight.protocol import (
    ColumnOptions,
    Shard,
    format_type,
    parse_type,
    types_compatible,
)
from lavender_flight.protocol.errors import (
    DatasetAlreadyExists,
    DatasetNotFound,
    InvalidArgument,
    LavenderError,
    ShardsetNotFound,
)

UID_TEXT = [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="text", type_="str")]


def shard(index: int, rows: int = 10, uid_min: int = 0) -> Shard:
    return Shard(
        shardset_id="",
        index=index,
        location=f"file:///x/shard.{index:08d}.parquet",
        format="parquet",
        num_rows=rows,
        size_bytes=100,
        uid_min=uid_min,
        uid_max=uid_min + rows - 1,
        created_at=time.time(),
    )


def test_dataset_lifecycle(catalog: Catalog) -> None:
    dataset = catalog.create_dataset("images", "uid")
    assert re.fullmatch(r"ds-[0-9a-f]{12}", dataset.id)
    assert catalog.get_dataset(name="images") == dataset
    assert catalog.get_dataset(dataset_id=dataset.id).name == "images"
    assert [d.name for d in catalog.list_datasets()] == ["images"]
    catalog.delete_dataset(dataset.id)
    assert catalog.list_datasets() == []
    with pytest.raises(DatasetNotFound, match="no dataset with id"):
        catalog.get_dataset(dataset_id=dataset.id)


def test_dataset_names_unique_and_valid(catalog: Catalog) -> None:
    catalog.create_dataset("a", "uid")
    with pytest.raises(DatasetAlreadyExists, match="'a' exists"):
        catalog.create_dataset("a", "id")
    for bad in ["", " a", "a/b", "x" * 300]:
        with pytest.raises(InvalidArgument):
            catalog.create_dataset(bad, "uid")
    assert len(catalog.list_datasets()) == 1


def test_shardsets_main_columns_and_shards(catalog: Catalog) -> None:
    ds = catalog.create_dataset("d", "uid")
    main = catalog.create_shardset(ds.id, "file:///m", UID_TEXT, shards=[shard(0), shard(1, 5, 10)])
    extra = catalog.create_shardset(
        ds.id,
        "file:///f",
        [ColumnOptions(name="uid", type_="int"), ColumnOptions(name="emb", type_="list<float32>")],
    )
    assert main.is_main and not extra.is_main
    assert (main.shard_count, main.total_samples) == (2, 15)
    assert [c.type_ for c in extra.columns] == ["int64", "list<item: float32>"]
    dataset = catalog.get_dataset(dataset_id=ds.id)
    assert [s.id for s in dataset.shardsets] == [main.id, extra.id]
    assert dataset.total_samples == 15
    assert [s.uid_max for s in catalog.list_shards(main.id)] == [9, 14]
    # is_main moves the role
    third = catalog.create_shardset(
        ds.id, "file:///t", [ColumnOptions(name="uid", type_="int")], is_main=True
    )
    assert catalog.get_dataset(dataset_id=ds.id).main_shardset.id == third.id  # type: ignore[union-attr]
    # deleting the main one hands the role to the oldest remaining
    catalog.delete_shardset(ds.id, third.id)
    assert catalog.get_dataset(dataset_id=ds.id).main_shardset.id == main.id  # type: ignore[union-attr]
    with pytest.raises(ShardsetNotFound):
        catalog.get_shardset(ds.id, third.id)


def test_shardset_refusals_leave_nothing(catalog: Catalog) -> None:
    ds = catalog.create_dataset("d", "uid")
    catalog.create_shardset(ds.id, "file:///m", UID_TEXT)
    with pytest.raises(InvalidArgument, match="uid column 'uid'"):
        catalog.create_shardset(ds.id, "file:///x", [ColumnOptions(name="text2", type_="str")])
    with pytest.raises(InvalidArgument, match="clash.*'text'"):
        catalog.create_shardset(ds.id, "file:///y", UID_TEXT, shards=[shard(0)])
    with pytest.raises(DatasetNotFound):
        catalog.create_shardset("ds-nope", "file:///y", UID_TEXT)
    dataset = catalog.get_dataset(dataset_id=ds.id)
    assert len(dataset.shardsets) == 1 and dataset.total_samples == 0


def test_replace_shards_is_atomic(catalog: Catalog) -> None:
    ds = catalog.create_dataset("d", "uid")
    ss = catalog.create_shardset(ds.id, "file:///m", UID_TEXT, shards=[shard(0), shard(1)])
    catalog.replace_shards(ss.id, [shard(1, rows=50), shard(2)], remove=[0])
    assert [(s.index, s.num_rows) for s in catalog.list_shards(ss.id)] == [(1, 50), (2, 10)]
    with pytest.raises(adbc_driver_manager.IntegrityError):
        # the same index twice in one call violates the primary key: nothing may change
        catalog.replace_shards(ss.id, [shard(5), shard(5)], remove=[1])
    assert [s.index for s in catalog.list_shards(ss.id)] == [1, 2]


def test_schema_version_and_reopen(catalog_target: str) -> None:
    first = open_catalog(catalog_target)
    assert first.schema_version == SCHEMA_VERSION
    ds = first.create_dataset("keep", "uid")
    first.close()
    again = open_catalog(catalog_target)
    assert again.get_dataset(name="keep").id == ds.id
    again.close()


def test_newer_schema_is_refused(catalog_target: str) -> None:
    cat = open_catalog(catalog_target)
    cat._query("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    cat.close()
    with pytest.raises(LavenderError, match="newer than this"):
        open_catalog(catalog_target)


def test_concurrent_writers_and_readers(catalog_target: str) -> None:
    """Threads create datasets while others list them: no 'database is locked', nothing lost."""
    cat = open_catalog(catalog_target)
    errors: list[BaseException] = []
    seen: dict[int, list[int]] = {0: [], 1: []}

    def write(worker: int) -> None:
        try:
            for i in range(25):
                ds = cat.create_dataset(f"w{worker}-{i}", "uid")
                cat.create_shardset(ds.id, f"file:///{worker}/{i}", UID_TEXT, shards=[shard(0)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def read(reader: int) -> None:
        try:
            for _ in range(40):
                seen[reader].append(len(cat.list_datasets()))
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    # a second Catalog object on the same database stands for a second process
    other = open_catalog(catalog_target)
    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=read, args=(r,)) for r in range(2)]
    threads.append(threading.Thread(target=lambda: [other.list_datasets() for _ in range(20)]))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    datasets = cat.list_datasets()
    assert len(datasets) == 100
    assert all(d.total_samples == 10 for d in datasets)
    for counts in seen.values():  # a reader never sees the count go back
        assert counts == sorted(counts) and len(counts) == 40
    cat.close()
    other.close()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("int", pa.int64()),
        ("str", pa.string()),
        ("float", pa.float64()),
        ("bool", pa.bool_()),
        ("bytes", pa.binary()),
        ("float32", pa.float32()),
        ("list<float32>", pa.list_(pa.float32())),
        ("list<item: int64>", pa.list_(pa.int64())),
        ("fixed_size_list<item: float32>[4]", pa.list_(pa.float32(), 4)),
        (
            "struct<a: int32, b: list<item: string>>",
            pa.struct([("a", pa.int32()), ("b", pa.list_(pa.string()))]),
        ),
        ("timestamp[us, tz=UTC]", pa.timestamp("us", tz="UTC")),
        ("decimal128(10, 2)", pa.decimal128(10, 2)),
        ("map<string, float64>", pa.map_(pa.string(), pa.float64())),
    ],
)
def test_parse_type(text: str, expected: pa.DataType) -> None:
    parsed = parse_type(text)
    assert parsed.equals(expected)
    assert parse_type(format_type(parsed)).equals(expected)


@pytest.mark.parametrize("text", ["nope", "list<", "int64 extra", "timestamp", "struct<a>"])
def test_parse_type_errors_list_examples(text: str) -> None:
    with pytest.raises(InvalidArgument, match="unknown column type .*examples: int, str"):
        parse_type(text)


def test_types_compatible() -> None:
    assert types_compatible(pa.string(), pa.large_string())
    assert types_compatible(pa.string(), pa.dictionary(pa.int32(), pa.string()))
    assert types_compatible(pa.list_(pa.float32()), pa.large_list(pa.float32()))
    assert not types_compatible(pa.string(), pa.int64())
    assert not types_compatible(pa.int32(), pa.int64())
    assert not types_compatible(pa.list_(pa.float32(), 4), pa.list_(pa.float32(), 3))
