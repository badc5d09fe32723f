"""Joinable shardsets: aligned and unaligned feature shardsets, left and inner joins, projection.

Everything runs against the real Flight server of the fixtures (in this process, so a test
can watch which files the server reads) with shards written as files and registered by sync.
"""

from __future__ import annotations

import collections
import itertools
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from lavender_flight.client import ClientSettings, Iteration, LavenderClient, Writer
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService, shards
from lavender_flight.flight_server import reading as reading_module
from lavender_flight.flight_server import service as service_module
from lavender_flight.flight_server import uid_index as uid_index_module
from lavender_flight.protocol import Dataset, wire
from lavender_flight.protocol.errors import InvalidArgument, SchemaMismatch, ShardNotFound
from tests.conftest import call_options

ROWS = 300


def write_shards(folder: Path, table: pa.Table, bounds: list[int]) -> None:
    """Write ``table`` as Parquet shards cut at ``bounds`` (row offsets, first 0, last len)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        pq.write_table(table.slice(start, stop - start), folder / f"shard.{index:05d}.parquet")


def main_table(rows: int = ROWS, uid: pa.Array | None = None) -> pa.Table:
    uids = uid if uid is not None else pa.array(np.arange(rows) * 3 + 1, pa.int64())
    return pa.table({"uid": uids, "text": [f"sample {i}" for i in range(rows)]})


def feature(uids: np.ndarray | list[Any], **columns: Any) -> pa.Table:
    return pa.table({"uid": uids, **columns})


def columns(**types: str) -> list[lavender.DatasetColumnOptions]:
    """Column declarations ``name=type``."""
    return [lavender.DatasetColumnOptions(name=n, type_=t) for n, t in types.items()]


def as_dict(table: pa.Table, column: str) -> dict[Any, Any]:
    return dict(zip(table.column("uid").to_pylist(), table.column(column).to_pylist(), strict=True))


def epoch(dataset_id: str, **kwargs: Any) -> pa.Table:
    """Every batch of one epoch, as one table (acknowledged as it goes)."""
    kwargs.setdefault("batch_size", 16)
    batches = list(Iteration.from_dataset(dataset_id, format="arrow", **kwargs))
    return pa.Table.from_batches(batches) if batches else pa.table({})


@pytest.fixture
def dataset(client: LavenderClient, data_dir: Path) -> Dataset:
    """300 samples with uids 1, 4, 7, ... in three main shards of 100, 120 and 80 rows."""
    write_shards(data_dir / "main", main_table(), [0, 100, 220, ROWS])
    created = lavender.create_dataset("joins")
    lavender.create_shardset(created.id, (data_dir / "main").as_uri())
    return lavender.get_dataset(created.id)


class Watch:
    """Counts the shard files the server reads and the uid lookups its joins make."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files: collections.Counter[str] = collections.Counter()
        self.tables: dict[str, pa.Table] = {}  # the last table read from each file
        self.lookups = 0
        real_read = shards.read_shard
        real_lookup = uid_index_module.UidIndex.lookup

        def read_shard(location: Any, path: str, *args: Any, **kwargs: Any) -> pa.Table:
            name = Path(path).parent.name + "/" + Path(path).name
            self.files[name] += 1
            self.tables[name] = real_read(location, path, *args, **kwargs)
            return self.tables[name]

        def lookup(index: Any, uids: Any) -> Any:
            self.lookups += 1
            return real_lookup(index, uids)

        monkeypatch.setattr(reading_module, "read_shard", read_shard)
        monkeypatch.setattr(service_module, "read_shard", read_shard)
        monkeypatch.setattr(uid_index_module.UidIndex, "lookup", lookup)

    def folders(self) -> set[str]:
        return {name.split("/")[0] for name in self.files}


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Watch:
    return Watch(monkeypatch)


def test_aligned_shardset_attaches_columns_without_lookups(
    dataset: Dataset, data_dir: Path, service: LavenderService, watch: Watch
) -> None:
    uids = main_table().column("uid").to_numpy()
    write_shards(
        data_dir / "aligned",
        feature(uids, score=pa.array(uids / 2, pa.float32())),
        [0, 100, 220, ROWS],
    )
    lavender.create_shardset(dataset.id, (data_dir / "aligned").as_uri())
    before = service.join_cache.nbytes
    watch.files.clear()  # creating it read every shard once (sync): count from here

    table = epoch(dataset.id)

    assert table.column_names == ["uid", "text", "score"]
    assert table.column("uid").to_pylist() == uids.tolist()
    assert table.column("score").to_pylist() == (uids / 2).tolist()
    # each main shard read its aligned partner once, checked it, and looked nothing up
    assert watch.files == {
        f"{f}/shard.0000{i}.parquet": 1 for f in ("main", "aligned") for i in range(3)
    }
    assert watch.lookups == 0
    assert service.join_cache.nbytes == before  # nothing went through the join cache
    # attached without a copy: the joined column is the very memory read from the file
    reader = service.reader(service.get_dataset(dataset_id=dataset.id))
    joined, missing = reader.read_joined(reader.main_shard(1))
    read = watch.tables["aligned/shard.00001.parquet"].column("score")
    assert missing is None
    assert [c.buffers()[1].address for c in joined.column("score").chunks] == [
        c.buffers()[1].address for c in read.chunks
    ]


def test_unaligned_shardset_joins_by_uid_in_order_and_shuffled(
    dataset: Dataset, data_dir: Path, watch: Watch, raw_flight: flight.FlightClient
) -> None:
    uids = main_table().column("uid").to_numpy()
    order = np.random.default_rng(5).permutation(len(uids))
    write_shards(
        data_dir / "shuffled",
        feature(uids[order], score=pa.array(uids[order] * 10)),
        [0, 37, 90, 91, 200, ROWS],  # five shards of other sizes (one of a single row)
    )
    lavender.create_shardset(dataset.id, (data_dir / "shuffled").as_uri())
    watch.files.clear()

    in_order = epoch(dataset.id)
    shuffled = epoch(dataset.id, shuffle=True, shuffle_seed=3, shuffle_block_size=2)

    assert in_order.column("uid").to_pylist() == uids.tolist()
    assert as_dict(in_order, "score") == {int(u): int(u) * 10 for u in uids}
    assert sorted(shuffled.column("uid").to_pylist()) == uids.tolist()
    assert shuffled.column("uid").to_pylist() != uids.tolist()
    assert as_dict(shuffled, "score") == as_dict(in_order, "score")
    assert watch.lookups > 0
    # feature shards are read once and kept (two epochs): not once per main shard
    assert {n for name, n in watch.files.items() if name.startswith("shuffled/")} == {1}

    # the any-language path: plain list_flights / get_flight_info / do_get
    info = raw_flight.get_flight_info(flight.FlightDescriptor.for_path("joins"), call_options())
    table = pa.concat_tables(
        raw_flight.do_get(endpoint.ticket, call_options()).read_all() for endpoint in info.endpoints
    )
    assert table.column_names == ["uid", "text", "score"]
    assert as_dict(table, "score") == as_dict(in_order, "score")


def test_missing_uids_are_null_under_left_join_and_filtered_under_inner(
    dataset: Dataset, data_dir: Path, raw_flight: flight.FlightClient
) -> None:
    uids = main_table().column("uid").to_numpy()
    present = uids[(uids % 2 == 0) | (uids < 40)][::-1]  # some missing, reversed order
    extra = np.array([2, 5, 10_000])  # uids the main shardset lacks: never delivered
    write_shards(
        data_dir / "partial",
        feature(
            np.concatenate([present, extra]), label=pa.array(np.concatenate([present, extra]) % 7)
        ),
        [0, 50, len(present) + 3],
    )
    lavender.create_shardset(dataset.id, (data_dir / "partial").as_uri())
    expected = {int(u): int(u) % 7 for u in present}

    left = epoch(dataset.id)
    assert left.num_rows == ROWS
    assert as_dict(left, "label") == {int(u): expected.get(int(u)) for u in uids}

    for kwargs in ({}, {"shuffle": True, "shuffle_seed": 1}):
        iteration = Iteration.from_dataset(
            dataset.id, batch_size=16, join="inner", format="arrow", **kwargs
        )
        batches = list(iteration)
        inner = pa.Table.from_batches(batches)
        assert sorted(inner.column("uid").to_pylist()) == sorted(expected)
        assert as_dict(inner, "label") == expected
        assert all(b.num_rows == 16 for b in batches[:-1])  # batches stay full
        progress = lavender.get_iteration(iteration.id)
        assert progress.done
        assert (progress.completed, progress.filtered) == (len(expected), ROWS - len(expected))

    preview = lavender.preview_dataset(dataset.id, offset=0, limit=ROWS)
    assert preview.num_rows == ROWS
    # the inner join on the raw read path too
    ticket = wire.ShardTicket(dataset_id=dataset.id, shard_index=0, join="inner")
    first = raw_flight.do_get(flight.Ticket(wire.encode(ticket)), call_options()).read_all()
    assert first.column("uid").to_pylist() == [u for u in uids[:100].tolist() if u in expected]
    assert lavender.read_shard(dataset.id, 0, join="inner").equals(first)  # the client's way


def test_three_shardsets_aligned_unaligned_and_partial(dataset: Dataset, data_dir: Path) -> None:
    uids = main_table().column("uid").to_numpy()
    write_shards(data_dir / "a", feature(uids, a=uids + 1), [0, 100, 220, ROWS])
    order = np.random.default_rng(1).permutation(len(uids))[: ROWS - 30]  # 30 missing
    write_shards(
        data_dir / "b", feature(uids[order], b=[f"b{u}" for u in uids[order]]), [0, 70, 270]
    )
    lavender.create_shardset(dataset.id, (data_dir / "a").as_uri())
    lavender.create_shardset(dataset.id, (data_dir / "b").as_uri())
    has_b = set(uids[order].tolist())

    table = epoch(dataset.id, shuffle=True, shuffle_seed=9)

    assert table.column_names == ["uid", "text", "a", "b"]
    rows = {row["uid"]: row for row in table.to_pylist()}
    assert sorted(rows) == uids.tolist()
    for u, row in rows.items():
        assert row["a"] == u + 1
        assert row["b"] == (f"b{u}" if u in has_b else None)
    inner = epoch(dataset.id, join="inner", batch_size=7)
    assert sorted(inner.column("uid").to_pylist()) == sorted(has_b)


def test_projection_never_opens_a_shardset_it_does_not_need(
    dataset: Dataset, data_dir: Path, watch: Watch
) -> None:
    uids = main_table().column("uid").to_numpy()
    write_shards(data_dir / "wanted", feature(uids[::-1], w=uids * 2), [0, 150, ROWS])
    write_shards(data_dir / "unwanted", feature(uids, big=[b"x" * 100] * ROWS), [0, 100, 220, ROWS])
    lavender.create_shardset(dataset.id, (data_dir / "wanted").as_uri())
    unwanted = lavender.create_shardset(dataset.id, (data_dir / "unwanted").as_uri())
    watch.files.clear()

    by_columns = epoch(dataset.id, columns=["text", "w"], shuffle=True)
    shardsets = [s.id for s in lavender.get_dataset(dataset.id).shardsets if s.id != unwanted.id]
    by_shardsets = epoch(dataset.id, shardsets=shardsets)

    assert by_columns.column_names == ["uid", "text", "w"]
    assert by_shardsets.column_names == ["uid", "text", "w"]
    assert watch.folders() == {"main", "wanted"}  # the reads it made: none in "unwanted"
    # and it could not have: its files are gone, yet the projected reads still work
    for path in (data_dir / "unwanted").iterdir():
        path.unlink()
    assert epoch(dataset.id, columns=["w"]).column_names == ["uid", "w"]
    with pytest.raises(ShardNotFound, match="unwanted"):
        epoch(dataset.id, columns=["w", "big"])


def test_clashing_names_and_other_uid_kinds_are_refused_before_any_read(
    dataset: Dataset, data_dir: Path, watch: Watch
) -> None:
    uids = main_table().column("uid").to_numpy()
    write_shards(data_dir / "clash", feature(uids, text=["again"] * ROWS), [0, ROWS])
    write_shards(data_dir / "strings", feature([str(u) for u in uids], s=uids), [0, ROWS])

    with pytest.raises(InvalidArgument, match=r"column names clash.*'text' \(in shardset ss-"):
        lavender.create_shardset(
            dataset.id, (data_dir / "clash").as_uri(), columns(uid="int", text="str")
        )
    with pytest.raises(InvalidArgument, match="uid column 'uid' is string here but int64"):
        lavender.create_shardset(
            dataset.id, (data_dir / "strings").as_uri(), columns(uid="str", s="int")
        )
    assert watch.files == {}  # refused from the columns alone: no shard was read
    assert len(lavender.get_dataset(dataset.id).shardsets) == 1


def test_a_uid_held_twice_by_a_feature_shardset_is_refused_at_sync(
    dataset: Dataset, data_dir: Path
) -> None:
    uids = main_table().column("uid").to_numpy()
    write_shards(data_dir / "f", feature(uids[:100], f=uids[:100]), [0, 100])
    shardset = lavender.create_shardset(dataset.id, (data_dir / "f").as_uri())
    write_shards(data_dir / "more", feature(uids[90:120], f=uids[90:120]), [0, 30])
    (data_dir / "more" / "shard.00000.parquet").rename(data_dir / "f" / "shard.00001.parquet")

    with pytest.raises(SchemaMismatch, match=r"uid 271 appears more than once in shardset"):
        lavender.sync_shardset(dataset.id, shardset.id)
    assert lavender.get_shardset(dataset.id, shardset.id).shard_count == 1  # unchanged
    (data_dir / "f" / "shard.00001.parquet").unlink()
    write_shards(data_dir / "more", feature(uids[100:120], f=uids[100:120]), [0, 20])
    (data_dir / "more" / "shard.00000.parquet").rename(data_dir / "f" / "shard.00001.parquet")
    assert lavender.sync_shardset(dataset.id, shardset.id).total_samples == 120
    table = epoch(dataset.id)
    assert as_dict(table, "f") == {int(u): int(u) if u in uids[:120] else None for u in uids}


def test_string_uids_join_exactly_even_when_hashes_collide(
    client: LavenderClient, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"img-{i:04d}" for i in range(200)]
    write_shards(data_dir / "m", main_table(200, pa.array(names)), [0, 64, 200])
    order = np.random.default_rng(2).permutation(200)[:150]
    picked = [names[i] for i in order]
    write_shards(data_dir / "f", feature(picked, n=[int(p[4:]) for p in picked]), [0, 50, 150])
    # a hash that collides a lot: every uid of the same length gets the same key
    monkeypatch.setattr(
        uid_index_module,
        "_hash_strings",
        lambda array: pa.compute.binary_length(array).to_numpy().astype(np.int64),
    )
    dataset = lavender.create_dataset("strings", uid_column_name="uid")
    lavender.create_shardset(dataset.id, (data_dir / "m").as_uri())
    lavender.create_shardset(dataset.id, (data_dir / "f").as_uri())

    table = epoch(dataset.id, shuffle=True)
    assert as_dict(table, "n") == {n: (int(n[4:]) if n in set(picked) else None) for n in names}
    inner = epoch(dataset.id, join="inner")
    assert sorted(inner.column("uid").to_pylist()) == sorted(picked)


def test_shards_written_through_the_server_join_and_replace(
    dataset: Dataset, data_dir: Path
) -> None:
    uids = main_table().column("uid").to_numpy()
    shardset = lavender.create_shardset(
        dataset.id, (data_dir / "written").as_uri(), columns(uid="int", v="int64")
    )
    writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset.id)
    writer.write(feature(uids[::2], v=uids[::2]), shard_index=0)
    assert as_dict(epoch(dataset.id), "v") == {
        int(u): (int(u) if i % 2 == 0 else None) for i, u in enumerate(uids)
    }
    writer.write(feature(uids[::-1], v=-uids[::-1]), shard_index=0, overwrite=True)
    assert as_dict(epoch(dataset.id), "v") == {int(u): -int(u) for u in uids}


def test_indexes_are_built_at_sync_and_reused_after_a_restart(
    dataset: Dataset, data_dir: Path, service: LavenderService, monkeypatch: pytest.MonkeyPatch
) -> None:
    uids = main_table().column("uid").to_numpy()
    write_shards(data_dir / "f", feature(uids[::-1], f=uids), [0, 120, ROWS])
    shardset = lavender.create_shardset(dataset.id, (data_dir / "f").as_uri())
    folder = service.indexes.root / shardset.id  # type: ignore[operator]
    assert len(list(folder.glob("index-*.arrow"))) == 1  # built at sync
    assert len(list(folder.glob("run-*.arrow"))) == 2

    # another server on the same catalog reads the saved index: nothing is rebuilt
    builds: list[str] = []
    real_build = uid_index_module.UidIndexes._build

    def counting_build(self: Any, shardset_id: str, *args: Any) -> Any:
        builds.append(shardset_id)
        return real_build(self, shardset_id, *args)

    monkeypatch.setattr(uid_index_module.UidIndexes, "_build", counting_build)
    again = LavenderService(service.catalog)
    second = LavenderFlightServer(again, "grpc://127.0.0.1:0")
    try:
        with LavenderClient(ClientSettings(f"grpc://127.0.0.1:{second.port}")) as other:
            assert as_dict(epoch(dataset.id, client=other), "f") == dict(
                zip(uids[::-1].tolist(), uids.tolist(), strict=True)
            )
    finally:
        second.shutdown()
    assert builds == []

    # a sync that adds a shard builds the new index from the saved runs plus the new shard
    write_shards(data_dir / "g", feature(np.array([10_000]), f=np.array([1])), [0, 1])
    (data_dir / "g" / "shard.00000.parquet").rename(data_dir / "f" / "shard.00002.parquet")
    lavender.sync_shardset(dataset.id, shardset.id)
    assert builds == [shardset.id]
    assert len(list(folder.glob("index-*.arrow"))) == 1  # the old one is gone
    lavender.delete_shardset(dataset.id, shardset.id)
    assert not folder.exists()


def test_inner_join_over_two_ranks_resumes_without_loss_or_repeats(
    dataset: Dataset, data_dir: Path
) -> None:
    uids = main_table().column("uid").to_numpy()
    kept = uids[uids % 5 != 0]
    write_shards(data_dir / "f", feature(kept[::-1], k=kept[::-1]), [0, 33, len(kept)])
    lavender.create_shardset(dataset.id, (data_dir / "f").as_uri())
    spec: dict[str, Any] = {
        "batch_size": 10,
        "shuffle": True,
        "shuffle_seed": 4,
        "world_size": 2,
        "join": "inner",
        "iteration_id": "inner-run",
        "format": "arrow",
    }

    first_part = []
    for number, batch in enumerate(Iteration.from_dataset(dataset.id, rank=0, **spec)):
        first_part.extend(batch.column("uid").to_pylist())
        if number == 3:
            break  # the job stops mid-epoch (a batch handed out counts as consumed)
    rest = [
        u
        for batch in Iteration.resume("inner-run", rank=0, format="arrow")
        for u in batch.column("uid").to_pylist()
    ]
    other = [
        u
        for batch in Iteration.from_dataset(dataset.id, rank=1, **spec)
        for u in batch.column("uid").to_pylist()
    ]

    delivered = first_part + rest + other
    assert len(first_part) == 40
    assert len(delivered) == len(set(delivered))  # nothing twice
    assert sorted(delivered) == sorted(kept.tolist())  # nothing lost, nothing missing joined
    progress = lavender.get_iteration("inner-run")
    assert progress.done
    assert (progress.completed, progress.filtered) == (len(kept), ROWS - len(kept))


def test_a_new_main_shardset_takes_over_and_the_old_one_adds_columns(
    dataset: Dataset, data_dir: Path
) -> None:
    uids = main_table().column("uid").to_numpy()
    chosen = uids[::3][::-1]  # a third of the samples, in another order
    write_shards(data_dir / "new-main", feature(chosen, rank=np.arange(len(chosen))), [0, 60, 100])
    lavender.create_shardset(dataset.id, (data_dir / "new-main").as_uri(), is_main=True)

    table = epoch(dataset.id)

    assert table.column_names == ["uid", "rank", "text"]
    assert table.column("uid").to_pylist() == chosen.tolist()  # the new main decides
    texts = dict(zip(uids.tolist(), main_table().column("text").to_pylist(), strict=True))
    assert as_dict(table, "text") == {int(u): texts[int(u)] for u in chosen}


def test_the_join_cache_stays_within_its_bytes_and_shares_reads() -> None:
    cache = reading_module.ShardCache(max_bytes=3 * 8000)
    reads: list[int] = []

    def table(n: int) -> pa.Table:
        reads.append(n)
        return pa.table({"x": np.full(1000, n, dtype=np.int64)})  # 8,000 bytes

    for n in range(5):
        assert cache.get(n, lambda n=n: table(n)).column("x")[0].as_py() == n
        assert cache.nbytes <= cache.max_bytes
    cache.get(4, lambda: table(4))
    cache.get(0, lambda: table(0))  # evicted long ago: read again
    assert reads == [0, 1, 2, 3, 4, 0]
    big = cache.get("big", lambda: pa.table({"x": np.zeros(10_000)}))  # larger than the cache
    assert big.num_rows == 10_000 and cache.nbytes <= cache.max_bytes

    # threads missing the same key at once share one read
    gate = threading.Event()
    slow_reads: list[int] = []

    def slow() -> pa.Table:
        slow_reads.append(1)
        gate.wait(5)
        return pa.table({"x": [1]})

    results: list[pa.Table] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("slow", slow))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join(10)
    assert len(results) == 4 and slow_reads == [1]
