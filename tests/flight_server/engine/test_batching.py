"""Processed batches through a real server: row-wise processing a message at a time, and
messages of about ``MESSAGE_BYTES``; a filtered stream's batcher on its own: what its claims
ask for, and that its batches span every sample once whatever order the work comes in."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.engine import EpochPlan, World
from lavender_flight.flight_server.engine.batching import (
    CLAIM_MESSAGES,
    MAX_CLAIM_SCALE,
    MESSAGE_BYTES,
    Message,
    PlainBatcher,
    TransformedBatcher,
)
from lavender_flight.flight_server.engine.blocks import Kept, Rows
from lavender_flight.protocol import Dataset
from lavender_flight.transforms import Plugins
from tests.conftest import call_options

PICKY = '''
from lavender_flight.transforms import Preprocessor


class PickyBatches(Preprocessor, name="picky_batches"):
    """Fails on uids divisible by 7 (batch at a time)."""

    def process(self, batch):
        if any(u % 7 == 0 for u in batch.column("uid").to_pylist()):
            raise ValueError("uid divisible by 7")
        return batch


class PickyRows(PickyBatches, name="picky_rows"):
    """The same, row-wise: the server may hand it several batches' rows at once."""

    rowwise = True
'''
TOTAL = 700


@pytest.fixture
def url(catalog: Catalog, tmp_path: Path) -> Iterator[str]:
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "picky.py").write_text(PICKY)
    server = LavenderFlightServer(LavenderService(catalog), plugins=Plugins.load(folder))
    conn = lavender.init(f"grpc://127.0.0.1:{server.port}", timeout=60)
    try:
        yield f"grpc://127.0.0.1:{server.port}"
    finally:
        conn.close()
        lavender._client = None
        server.shutdown()


@pytest.fixture
def dataset(url: str, data_dir: Path) -> Dataset:
    dataset = lavender.create_dataset("rowwise")
    shardset = lavender.create_shardset(
        dataset.id,
        data_dir.as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="text", type_="str"),
        ],
    )
    writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset.id)
    for index, start in enumerate(range(0, TOTAL, 250)):  # 3 shards: batches straddle them
        uids = range(start, min(TOTAL, start + 250))
        writer.write([{"uid": u, "text": "é" * (u % 9)} for u in uids], shard_index=index)
    return dataset


def test_rowwise_processing_gives_the_batches_of_batch_at_a_time(dataset: Dataset) -> None:
    def run(preprocessor: str) -> tuple[list[list[int]], list[list[int]], tuple[int, ...]]:
        it = Iteration.from_dataset(
            dataset.id,
            batch_size=20,
            filters=[("expression", {"expr": "uid % 3 != 0"})],
            preprocessors=[preprocessor, ("byte_tokenize", {"max_length": 6})],
            skip_on_failure=True,
        )
        batches = list(it)
        progress = lavender.get_iteration(it.id)
        counts = (progress.completed, progress.filtered, progress.failed, progress.done)
        masks = [m for b in batches for m in b["input_ids_mask"]]
        return [b["uid"] for b in batches], masks, counts

    rows, masks, counts = run("picky_rows")
    assert (rows, masks, counts) == run("picky_batches")
    kept = [u for u in range(TOTAL) if u % 3 and u % 7]
    assert [u for batch in rows for u in batch] == kept
    assert masks == [[1] * min(6, 2 * (u % 9)) + [0] * (6 - min(6, 2 * (u % 9))) for u in kept]
    filtered = sum(1 for u in range(TOTAL) if not u % 3)
    failed = sum(1 for u in range(TOTAL) if u % 3 and not u % 7)
    assert counts == (TOTAL - filtered - failed, filtered, failed, True)
    # a batch loses its failed rows, no more: at most 20 rows, and every batch but the
    # last started with 20 kept rows (uids not divisible by 3)
    assert all(len(b) <= 20 for b in rows) and len(rows) == -(-(TOTAL - filtered) // 20)


def test_processed_messages_stay_near_the_message_size(url: str, dataset: Dataset) -> None:
    """Large processed rows: several batches a message, but not many MB more than the size."""
    length = 8192  # 40 kB a row processed: a 16-row batch is 640 kB
    command = json.dumps(
        {
            "kind": "iteration",
            "iteration_id": "big-rows",
            "spec": {
                "dataset_id": dataset.id,
                "batch_size": 16,
                "preprocessors": [{"name": "byte_tokenize", "params": {"max_length": length}}],
            },
        }
    ).encode()
    raw = flight.connect(url)
    try:
        info = raw.get_flight_info(flight.FlightDescriptor.for_command(command), call_options())
        reader = raw.do_get(info.endpoints[0].ticket, call_options())
        sizes, uids = [], []
        for chunk in reader:
            metadata = json.loads(chunk.app_metadata.to_pybytes())
            batches = metadata["batches"]
            assert sum(rows for rows, _ in batches) == chunk.data.num_rows
            assert chunk.data.column("input_ids").type == pa.list_(pa.int32(), length)
            sizes.append((len(batches), chunk.data.nbytes))
            uids.extend(chunk.data.column("uid").to_pylist())
    finally:
        raw.close()
    assert uids == list(range(TOTAL))
    assert all(count == 1 or size <= MESSAGE_BYTES for count, size in sizes), sizes
    assert max(count for count, _ in sizes) > 1, sizes  # batches do share messages


class _Hold:
    def release(self) -> None:
        pass


class _Filtered:
    """A batcher's source: rows of ``uid`` = sequence number, kept where ``keep`` says."""

    def __init__(self, keep: np.ndarray) -> None:
        self.keep = keep
        self.table = pa.table({"uid": np.arange(len(keep), dtype=np.int64)})

    def kept(
        self, plan: EpochPlan, seq: np.ndarray, check: Callable[[], None] | None = None
    ) -> Kept:
        assert check is not None, "a batcher lets its stream stop while it waits for rows"
        assert bool((np.diff(seq) > 0).all()), "a batcher asks for ascending samples"
        keep = self.keep[seq]
        rows = self.table.take(pa.array(seq[keep]))
        return Kept(rows, keep, np.zeros(len(seq), dtype=bool))

    def hold_read_ahead(self) -> _Hold:
        return _Hold()


class _Chunks:
    """A stream's work: the epoch's chunks in a given order, each claim's chunks ascending."""

    def __init__(self, order: list[int], batch_size: int, total: int) -> None:
        self.order, self.batch_size, self.total = list(order), batch_size, total
        self.asked: list[int] = []
        self.released: list[tuple[list[tuple[int, int]], int, int]] = []

    def claim(self, max_chunks: int) -> list[list[tuple[int, int]]]:
        self.asked.append(max_chunks)
        taken, self.order = sorted(self.order[:max_chunks]), self.order[max_chunks:]
        size = self.batch_size
        return [[(c * size, min((c + 1) * size, self.total))] for c in taken]

    def room(self) -> int:
        return 1 << 40

    def release(self, ranges: list[tuple[int, int]], filtered: int, failed: int) -> None:
        self.released.append((ranges, filtered, failed))

    def check(self) -> None:
        pass


def _stream(
    keep: np.ndarray, batch_size: int, order: list[int] | None = None, max_chunks: int = 8
) -> tuple[list[Message], _Chunks]:
    plan = EpochPlan([len(keep)], batch_size)
    chunks = -(-len(keep) // batch_size)
    work = _Chunks(list(range(chunks)) if order is None else order, batch_size, len(keep))
    source = _Filtered(keep)
    batcher = TransformedBatcher(
        plan, source, World(), work, None, source.table.schema, max_chunks=max_chunks
    )
    return list(batcher), work


def _check_exactly_once(messages: list[Message], work: _Chunks, keep: np.ndarray) -> None:
    """Every sample spanned once; the rows are the kept samples; the dropped ones counted."""
    spanned = [
        x for m in messages for _, ranges in m.batches for a, b in ranges for x in range(a, b)
    ]
    spanned += [x for ranges, _, _ in work.released for a, b in ranges for x in range(a, b)]
    assert sorted(spanned) == list(range(len(keep)))
    for message in messages:
        uids = message.batch.column("uid").to_numpy()
        assert uids.tolist() == message.seq.tolist()
        assert sum(rows for rows, _ in message.batches) == len(uids)
        inside = {x for _, ranges in message.batches for a, b in ranges for x in range(a, b)}
        assert set(uids.tolist()) <= inside
        assert set(message.filtered.values.tolist()) == inside - set(uids.tolist())
    delivered = sorted(u for m in messages for u in m.batch.column("uid").to_pylist())
    assert delivered == np.flatnonzero(keep).tolist()
    filtered = sum(len(m.filtered) for m in messages) + sum(f for _, f, _ in work.released)
    assert filtered == len(keep) - int(keep.sum())


def test_a_filtered_stream_claims_more_chunks_the_more_its_filter_drops() -> None:
    """Claims ask for ``max_chunks`` of kept rows: 4 times as many chunks when a quarter
    stays, never more than ``MAX_CLAIM_SCALE`` times as many (a filter keeping 1 in 100)."""
    uids = np.arange(16 * 900)
    for keep, most in ((uids % 4 == 0, 32), (np.ones(len(uids), bool), 8)):
        messages, work = _stream(keep, 16)
        assert work.asked[:4] == [1, 2, 4, 8]
        assert max(work.asked) == most
        _check_exactly_once(messages, work, keep)
    messages, work = _stream(uids % 100 == 0, 16)
    assert max(work.asked) == 8 * MAX_CLAIM_SCALE
    _check_exactly_once(messages, work, uids % 100 == 0)


def test_filtered_batches_span_every_sample_once_when_the_work_comes_out_of_order() -> None:
    """Chunks claimed out of order (a stream taking over another's, a resume): the spans of a
    message's batches are found a batch at a time; what was dropped inside a span is counted
    with the message of its batch (also when the last batch travels apart, marked final)."""
    rng = random.Random(5)
    uids = np.arange(7 * 500 + 3)
    mixed = 0
    for keep in (uids % 3 == 1, np.isin(uids % 50, [0, 1, 2, 3, 10, 11]), uids < 100):
        order = list(range(-(-len(uids) // 7)))
        rng.shuffle(order)
        messages, work = _stream(keep, 7, order)
        _check_exactly_once(messages, work, keep)
        for message in messages:  # a batch that starts below where the one before ended
            ends = [ranges[-1][1] for _, ranges in message.batches]
            starts = [ranges[0][0] for _, ranges in message.batches]
            mixed += any(a < b for a, b in zip(starts[1:], ends, strict=False))
    assert mixed, "the work should come out of order within some message"


class _Wide:
    """A plain batcher's source: one table of 4 KiB rows (a 1024-row batch fills a message)."""

    def __init__(self, total: int) -> None:
        self.table = pa.table({"blob": pa.array([b"x" * 4096] * total, pa.binary())})

    def rows(
        self, plan: EpochPlan, seq: np.ndarray, check: Callable[[], None] | None = None
    ) -> Rows:
        assert check is not None, "a batcher lets its stream stop while it waits for rows"
        return Rows(self.table.slice(int(seq[0]), len(seq)))

    def boundary(self, plan: EpochPlan, seq: int) -> int:
        return self.table.num_rows

    def hold_read_ahead(self) -> _Hold:
        return _Hold()


def test_a_plain_stream_of_one_chunk_messages_claims_several_messages_at_once() -> None:
    """Only the first claim is one chunk: a message of one chunk (wide rows) used to make
    every claim ask for one, a catalog transaction per message."""
    batch, total = 1024, 1024 * 20
    source = _Wide(total)
    work = _Chunks(list(range(total // batch)), batch, total)
    plan = EpochPlan([total], batch)
    messages = list(PlainBatcher(plan, source, World(), work, source.table.schema))
    assert [m.batch.num_rows for m in messages] == [batch] * (total // batch)
    assert work.asked[0] == 1 and set(work.asked[1:]) == {CLAIM_MESSAGES}


class _Runs(_Wide):
    """A source of small rows that refuses rows not in one run (they would need a copy)."""

    def __init__(self, total: int) -> None:
        self.table = pa.table({"uid": pa.array(np.arange(total, dtype=np.int64))})

    def rows(
        self, plan: EpochPlan, seq: np.ndarray, check: Callable[[], None] | None = None
    ) -> Rows:
        assert int(seq[-1]) - int(seq[0]) == len(seq) - 1, "a message's rows are one run"
        return super().rows(plan, seq, check)


def test_a_worker_streaming_runs_of_chunks_sends_each_run_as_it_lies() -> None:
    """With ``worker_chunks``, a worker's chunks come in runs of consecutive rows: a message
    never spans two runs (it would be a gather of rows, a copy), and covers every chunk the
    worker owns once."""
    batch, total = 8, 8 * 45
    source = _Runs(total)
    world = World(worker=1, num_workers=2, worker_chunks=4)
    owned = [c for c in range(total // batch) if world.owns(c)]
    assert owned[:6] == [4, 5, 6, 7, 12, 13]
    work = _Chunks(owned, batch, total)
    plan = EpochPlan([total], batch)
    messages = list(PlainBatcher(plan, source, world, work, source.table.schema))
    runs = [m.batch.column("uid").to_pylist() for m in messages]
    assert sorted(u for run in runs for u in run) == [
        u for c in owned for u in range(c * batch, (c + 1) * batch)
    ]
    assert max(len(run) for run in runs) == 4 * batch  # a whole run in one message


def test_rows_in_long_runs_are_cut_as_slices_and_scattered_rows_taken() -> None:
    from lavender_flight.flight_server.engine.blocks import _cut

    table = pa.table({"uid": pa.array(np.arange(4096, dtype=np.int64))})
    base = table.column("uid").chunk(0).buffers()[1].address
    runs = np.concatenate([np.arange(0, 256), np.arange(512, 768), np.arange(1024, 1280)])
    cut = _cut(table, runs)
    assert cut.column("uid").to_pylist() == runs.tolist()
    for chunk in cut.column("uid").chunks:  # views of the table's buffer: no copy
        start = chunk.buffers()[1].address
        assert base <= start < base + 4096 * 8
    backwards = np.concatenate([np.arange(2048, 2304), np.arange(0, 256)])  # runs out of order
    assert _cut(table, backwards).column("uid").to_pylist() == backwards.tolist()
    scattered = np.arange(0, 4096, 3)
    taken = _cut(table, scattered)
    assert taken.column("uid").to_pylist() == scattered.tolist()
    assert taken.column("uid").num_chunks == 1


def test_a_filtered_piece_counts_kept_rows_that_are_slices_of_its_rows_once() -> None:
    from lavender_flight.flight_server.engine.blocks import _cut, _Piece
    from lavender_flight.flight_server.memory import table_bytes

    table = pa.table({"uid": pa.array(np.arange(4096, dtype=np.int64))})
    whole = table_bytes(table)
    runs = np.concatenate([np.arange(0, 1024), np.arange(2048, 3072)])  # slices: no copy
    sliced = _Piece(0, 4096, table, kept_rows=runs, kept_table=_cut(table, runs))
    assert sliced.nbytes == whole
    scattered = np.arange(0, 4096, 2)  # every other row: a copy of half the rows
    taken = _Piece(0, 4096, table, kept_rows=scattered, kept_table=_cut(table, scattered))
    assert taken.nbytes == whole + 2048 * 8
