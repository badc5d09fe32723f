"""Joinable shardsets: aligned and unaligned feature shardsets, left and inner joins, projection.

Everything runs against the real Flight server of the fixtures (in this process, so a test
can watch which files the server reads) with shards written as files and registered by sync.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import ClientSettings, Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.reading import ShardCache
from lavender_flight.flight_server.shard_io import ShardIO
from lavender_flight.flight_server.storage import Location
from lavender_flight.flight_server.uid_index import Matches, UidIndex, UidIndexes
from lavender_flight.protocol import Dataset, wire
from lavender_flight.protocol.errors import InvalidArgument, SchemaMismatch, ShardNotFound
from tests.conftest import CALL_TIMEOUT, call_options

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
def dataset(client: LavenderClient, data_dir: Path, watch: Watch) -> Dataset:
    """300 samples with uids 1, 4, 7, ... in three main shards of 100, 120 and 80 rows.

    The watch counts from here: the reads that registered them are forgotten.
    """
    write_shards(data_dir / "main", main_table(), [0, 100, 220, ROWS])
    created = lavender.create_dataset("joins")
    lavender.create_shardset(created.id, (data_dir / "main").as_uri())
    watch.files.clear()
    return lavender.get_dataset(created.id)


class CountingShardIO(ShardIO):
    """Counts the shard files the server reads (``folder/name``), keeping the last table of each."""

    def __init__(self) -> None:
        super().__init__()
        self.files: collections.Counter[str] = collections.Counter()
        self.tables: dict[str, pa.Table] = {}
        self._lock = threading.Lock()

    def read(self, where: Location, path: str, *args: Any, **kwargs: Any) -> pa.Table:
        table = super().read(where, path, *args, **kwargs)
        name = Path(path).parent.name + "/" + Path(path).name
        with self._lock:
            self.files[name] += 1
            self.tables[name] = table
        return table


@dataclass(frozen=True)
class LookupCountingIndex(UidIndex):
    """A uid index that counts its look-ups on the indexes that handed it out."""

    counter: LookupCountingIndexes | None = None

    def lookup(self, uids: pa.Array | pa.ChunkedArray) -> Matches:
        assert self.counter is not None
        self.counter.count()
        return super().lookup(uids)


class LookupCountingIndexes(UidIndexes):
    """Uid indexes that count the look-ups the joins make through them."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lookups = 0
        self._count_lock = threading.Lock()

    def count(self) -> None:
        with self._count_lock:
            self.lookups += 1

    def get(self, *args: Any, **kwargs: Any) -> UidIndex:
        found = super().get(*args, **kwargs)
        return LookupCountingIndex(
            found.keys, found.shards, found.rows, found.exact, found.keys_of, counter=self
        )


class Watch:
    """The shard files the server reads and the uid look-ups its joins make."""

    def __init__(self, catalog: Catalog) -> None:
        self.io = CountingShardIO()
        self.indexes = LookupCountingIndexes(catalog.path.with_name(catalog.path.name + ".indexes"))
        self.files = self.io.files
        self.tables = self.io.tables

    @property
    def lookups(self) -> int:
        return self.indexes.lookups

    def folders(self) -> set[str]:
        return {name.split("/")[0] for name in self.files}


@pytest.fixture
def watch(catalog: Catalog) -> Watch:
    return Watch(catalog)


@pytest.fixture
def service(catalog: Catalog, watch: Watch) -> LavenderService:
    """The server's service, watched (overrides conftest's)."""
    return LavenderService(catalog, shard_io=watch.io, indexes=watch.indexes)


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
    # the decoded files stay in the server's memory (one LRU for every read): the next
    # epoch reads none of them again
    assert service.join_cache.nbytes > before
    epoch(dataset.id)
    assert sum(watch.files.values()) == 6
    # attached without a copy: the joined column is the very memory read from the file
    reader = service.reader(service.get_dataset(dataset_id=dataset.id))
    joined, missing = reader.read_joined(reader.main_shard(1))
    read = watch.tables["aligned/shard.00001.parquet"].column("score")
    assert missing is None
    assert [c.buffers()[1].address for c in joined.column("score").chunks] == [
        c.buffers()[1].address for c in read.chunks
    ]
    # decoded, the same rows come without the store's lane; not decoded, none (no read)
    files = sum(watch.files.values())
    decoded = reader.read_decoded(reader.main_shard(1))
    assert decoded is not None and decoded[0].equals(joined) and decoded[1] is None
    service.join_cache.budget.clear()
    assert reader.read_decoded(reader.main_shard(1)) is None
    assert sum(watch.files.values()) == files


def test_unaligned_shardset_joins_by_uid_in_order_and_shuffled(
    dataset: Dataset,
    data_dir: Path,
    watch: Watch,
    raw_flight: flight.FlightClient,
    service: LavenderService,
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
    # every file decoded, but a join by uid is work: a block does it on the store's lane
    reader = service.reader(service.get_dataset(dataset_id=dataset.id))
    assert reader.read_decoded(reader.main_shard(0)) is None

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


class CollidingIndexes(UidIndexes):
    """Uid indexes whose string keys collide a lot: every uid of one length gets one key."""

    def keys(self, uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return np.asarray(pa.compute.binary_length(uids).to_numpy(), dtype=np.int64)


def test_string_uids_join_exactly_even_when_hashes_collide(
    catalog: Catalog, tmp_path: Path, data_dir: Path, reset_client: None
) -> None:
    names = [f"img-{i:04d}" for i in range(200)]
    write_shards(data_dir / "m", main_table(200, pa.array(names)), [0, 64, 200])
    order = np.random.default_rng(2).permutation(200)[:150]
    picked = [names[i] for i in order]
    write_shards(data_dir / "f", feature(picked, n=[int(p[4:]) for p in picked]), [0, 50, 150])
    colliding = LavenderService(catalog, indexes=CollidingIndexes(tmp_path / "colliding"))
    server = LavenderFlightServer(colliding, "grpc://127.0.0.1:0")
    try:
        lavender.init(f"grpc://127.0.0.1:{server.port}", timeout=CALL_TIMEOUT)
        dataset = lavender.create_dataset("strings", uid_column_name="uid")
        lavender.create_shardset(dataset.id, (data_dir / "m").as_uri())
        feature_set = lavender.create_shardset(dataset.id, (data_dir / "f").as_uri())

        table = epoch(dataset.id, shuffle=True)
        assert as_dict(table, "n") == {n: (int(n[4:]) if n in set(picked) else None) for n in names}
        inner = epoch(dataset.id, join="inner")
        assert sorted(inner.column("uid").to_pylist()) == sorted(picked)
    finally:
        lavender._client.close()  # type: ignore[union-attr]
        lavender._client = None
        server.shutdown()
    # the keys did collide: 150 uids of one length, one key
    index = colliding.indexes.get(
        feature_set.id, catalog.list_shards(feature_set.id), exact=False, read_uids=_no_read
    )
    assert set(index.keys.tolist()) == {len("img-0000")} and len(index) == 150


def _no_read(shard: Any) -> pa.ChunkedArray:
    raise AssertionError(f"the index of {shard.location} should have been saved")


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
    dataset: Dataset, data_dir: Path, service: LavenderService, caplog: pytest.LogCaptureFixture
) -> None:
    uids = main_table().column("uid").to_numpy()
    write_shards(data_dir / "f", feature(uids[::-1], f=uids), [0, 120, ROWS])
    shardset = lavender.create_shardset(dataset.id, (data_dir / "f").as_uri())
    folder = service.indexes.root / shardset.id  # type: ignore[operator]
    assert len(list(folder.glob("index-*.arrow"))) == 1  # built at sync
    assert len(list(folder.glob("run-*.arrow"))) == 2

    def builds() -> list[str]:
        """The shardsets whose uid index was built since the last call (the server log)."""
        found = re.findall(r"built the uid index of shardset (\S+):", caplog.text)
        caplog.clear()
        return found

    # another server on the same catalog reads the saved index: nothing is rebuilt
    caplog.set_level(logging.INFO, logger="lavender_flight.flight_server.uid_index")
    again = LavenderService(service.catalog)
    second = LavenderFlightServer(again, "grpc://127.0.0.1:0")
    try:
        with LavenderClient(ClientSettings(f"grpc://127.0.0.1:{second.port}")) as other:
            assert as_dict(epoch(dataset.id, client=other), "f") == dict(
                zip(uids[::-1].tolist(), uids.tolist(), strict=True)
            )
    finally:
        second.shutdown()
    assert builds() == []

    # a sync that adds a shard builds the new index from the saved runs plus the new shard
    write_shards(data_dir / "g", feature(np.array([10_000]), f=np.array([1])), [0, 1])
    (data_dir / "g" / "shard.00000.parquet").rename(data_dir / "f" / "shard.00002.parquet")
    lavender.sync_shardset(dataset.id, shardset.id)
    assert builds() == [shardset.id]
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
    cache = ShardCache(max_bytes=3 * 8000)
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

    # peek: a kept table (a use: it moves to the young end), never a read nor a wait
    assert cache.peek("absent") is None and cache.peek(0) is not None
    gate.clear()
    loading = threading.Thread(target=lambda: cache.get("loading", slow))
    loading.start()
    deadline = time.monotonic() + 10
    while len(slow_reads) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert cache.peek("loading") is None  # being read: the caller reads the usual way
    gate.set()
    loading.join(10)
    assert cache.peek("loading") is not None and slow_reads == [1, 1]


class HeldShardIO(CountingShardIO):
    """Holds the first read until ``release`` is set (``reading`` says it has started)."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = threading.Event()
        self.release = threading.Event()

    def read(self, where: Location, path: str, *args: Any, **kwargs: Any) -> pa.Table:
        if not self.reading.is_set():
            self.reading.set()
            assert self.release.wait(10), "the test never released the first read"
        return super().read(where, path, *args, **kwargs)


class SlowToWeighCache(ShardCache):
    """Weighs its first table only once another reader of the same key got its answer.

    That reader arrives after the read, before the table is kept: where the cache used to
    drop its "being read" mark before keeping the table, so the reader read it again.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.weighing = threading.Event()
        self.answered = threading.Event()
        self.waited: bool | None = None

    def weigh(self, table: pa.Table) -> int:
        if not self.weighing.is_set():
            self.weighing.set()
            self.waited = self.answered.wait(10)
        return super().weigh(table)


def one_shard(data_dir: Path) -> tuple[Location, str, pa.Schema]:
    """A real shard file and how to read it."""
    from lavender_flight.flight_server.shards import declared_schema
    from lavender_flight.flight_server.storage import resolve_location

    write_shards(data_dir / "cached", feature(np.arange(100), v=np.arange(100)), [0, 100])
    where = resolve_location((data_dir / "cached").as_uri())
    schema = declared_schema([("uid", "int64"), ("v", "int64")])
    return where, where.child("shard.00000.parquet"), schema


def test_a_reader_arriving_while_a_shard_is_read_waits_for_that_read(data_dir: Path) -> None:
    where, path, schema = one_shard(data_dir)
    io = HeldShardIO()
    cache = ShardCache(1 << 20)
    read = lambda: io.read(where, path, "parquet", schema)  # noqa: E731
    results: list[pa.Table] = []
    first = threading.Thread(target=lambda: results.append(cache.get("k", read)))
    first.start()
    assert io.reading.wait(10)
    second = threading.Thread(target=lambda: results.append(cache.get("k", read)))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # waiting for the read in progress, not reading on its own
    io.release.set()
    first.join(10)
    second.join(10)
    assert len(results) == 2 and results[0] is results[1]
    assert io.files == {"cached/shard.00000.parquet": 1}
    assert cache.get("k", read) is results[0] and sum(io.files.values()) == 1


def test_a_reader_arriving_between_the_read_and_its_keeping_reads_nothing(
    data_dir: Path,
) -> None:
    where, path, schema = one_shard(data_dir)
    io = CountingShardIO()
    cache = SlowToWeighCache(1 << 20)
    read = lambda: io.read(where, path, "parquet", schema)  # noqa: E731
    first: list[pa.Table] = []
    owner = threading.Thread(target=lambda: first.append(cache.get("k", read)))
    owner.start()
    assert cache.weighing.wait(10)  # read, not yet kept
    second = cache.get("k", read)
    cache.answered.set()
    owner.join(10)
    assert cache.waited is True  # the second reader was answered while the first was weighing
    assert io.files == {"cached/shard.00000.parquet": 1}  # exactly one read
    assert second is first[0]
    assert cache.nbytes == second.nbytes
