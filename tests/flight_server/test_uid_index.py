"""Uid indexes on their own: keys, look-ups, saved files, duplicates."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lavender_flight.flight_server.uid_index import UidIndex, UidIndexes, uid_keys
from lavender_flight.protocol import Shard
from lavender_flight.protocol.errors import SchemaMismatch


def shard(index: int, rows: int, location: str = "") -> Shard:
    return Shard(
        shardset_id="ss-1",
        index=index,
        location=location or f"file:///data/shard.{index}.parquet",
        format="parquet",
        num_rows=rows,
        size_bytes=100 + rows,
        created_at=1.5,
    )


@given(st.lists(st.text(max_size=12), max_size=40), st.integers(0, 5))
@settings(max_examples=60, deadline=None)
def test_string_keys_depend_on_the_text_only(texts: list[str], cut: int) -> None:
    array = pa.array(texts, pa.string())
    keys = uid_keys(array)
    assert keys.dtype == np.int64 and len(keys) == len(texts)
    # the same text gives the same key however the array is laid out
    assert uid_keys(pa.array(texts, pa.large_string())).tolist() == keys.tolist()
    assert uid_keys(array.slice(min(cut, len(texts)))).tolist() == keys[cut:].tolist()
    chunked = pa.chunked_array([array.slice(0, cut), array.slice(cut)], pa.string())
    assert uid_keys(chunked).tolist() == keys.tolist()
    by_text = {}
    for text, key in zip(texts, keys.tolist(), strict=True):
        assert by_text.setdefault(text, key) == key


def test_string_keys_spread_and_integers_are_exact() -> None:
    names = pa.array([f"img_{i:08d}" for i in range(200_000)] + ["", "a", "ab", "ba"])
    assert len(np.unique(uid_keys(names))) == len(names)
    assert uid_keys(pa.array([-3, 0, 2**40], pa.int64())).tolist() == [-3, 0, 2**40]
    assert uid_keys(pa.array([7], pa.uint8())).tolist() == [7]


def test_lookup_finds_every_candidate_grouped_by_shard() -> None:
    keys = np.array([5, 1, 9, 5, 3], dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    index = UidIndex(
        keys[order],
        np.array([2, 0, 1, 1, 0], dtype=np.int32)[order],
        np.array([0, 1, 2, 3, 4], dtype=np.int32)[order],
        exact=True,
    )
    assert index.repeats
    matches = index.lookup(pa.array([9, 4, 5, 1]))
    found = sorted(
        zip(matches.asked.tolist(), matches.shards.tolist(), matches.rows.tolist(), strict=True)
    )
    assert found == [(0, 1, 2), (2, 1, 3), (2, 2, 0), (3, 0, 1)]  # 4 is missing; 5 twice
    assert matches.shards.tolist() == sorted(matches.shards.tolist())
    assert [(s, p.stop - p.start) for s, p in matches.by_shard()] == [(0, 1), (1, 2), (2, 1)]

    unique = UidIndex(
        np.array([1, 3]), np.array([0, 4], np.int32), np.array([0, 0], np.int32), True
    )
    assert not unique.repeats
    matches = unique.lookup(pa.array([3, 2, 9, 1, 3]))
    assert sorted(zip(matches.asked.tolist(), matches.shards.tolist(), strict=True)) == [
        (0, 4),
        (3, 0),
        (4, 4),
    ]
    assert unique.lookup(pa.array([], pa.int64())).by_shard() == []


def test_indexes_are_saved_reused_and_rebuilt_when_a_shard_changes(tmp_path: Path) -> None:
    indexes = UidIndexes(tmp_path / "idx")
    shards = [shard(0, 3), shard(1, 2)]
    data = {0: pa.chunked_array([[30, 10, 20]]), 1: pa.chunked_array([[50, 40]])}
    reads: list[int] = []

    def read_uids(s: Shard) -> pa.ChunkedArray:
        reads.append(s.index)
        return data[s.index]

    index = indexes.get("ss-1", shards, exact=True, read_uids=read_uids)
    assert index.keys.tolist() == [10, 20, 30, 40, 50]
    assert list(zip(index.shards.tolist(), index.rows.tolist(), strict=True)) == [
        (0, 1), (0, 2), (0, 0), (1, 1), (1, 0),
    ]  # fmt: skip
    assert reads == [0, 1]  # no runs saved: read from the data once
    fresh = UidIndexes(tmp_path / "idx")  # a restart: the saved index is opened
    assert (
        fresh.get("ss-1", shards, exact=True, read_uids=read_uids).keys.tolist()
        == index.keys.tolist()
    )
    assert reads == [0, 1]

    # shard 1 rewritten: a new index from shard 0's saved run and shard 1's new one
    changed = shard(1, 2).model_copy(update={"created_at": time.time()})
    fresh.save_run("ss-1", changed, pa.array([60, 70]))
    again = fresh.get("ss-1", [shards[0], changed], exact=True, read_uids=read_uids)
    assert again.keys.tolist() == [10, 20, 30, 60, 70]
    assert reads == [0, 1]
    files = sorted(p.name.split("-")[0] for p in (tmp_path / "idx" / "ss-1").iterdir())
    assert files == ["index", "run", "run"]  # the old version's files are gone

    fresh.drop("ss-1")
    assert not (tmp_path / "idx" / "ss-1").exists()


def test_a_uid_held_twice_is_refused_only_when_asked(tmp_path: Path) -> None:
    indexes = UidIndexes(None)  # in memory
    shards = [shard(0, 2), shard(1, 2)]
    data = {0: pa.chunked_array([["a", "b"]]), 1: pa.chunked_array([["c", "b"]])}
    index = indexes.get("ss-2", shards, exact=False, read_uids=lambda s: data[s.index])
    assert len(index) == 4
    with pytest.raises(SchemaMismatch, match=r"uid 'b' appears more than once.*row 1 and"):
        indexes.get("ss-3", shards, exact=False, read_uids=lambda s: data[s.index], unique=True)


def test_an_unwritable_folder_keeps_indexes_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    indexes = UidIndexes(blocker / "idx")
    assert indexes.root is None
    index = indexes.get(
        "ss-1", [shard(0, 2)], exact=True, read_uids=lambda s: pa.chunked_array([[2, 1]])
    )
    assert index.keys.tolist() == [1, 2]
