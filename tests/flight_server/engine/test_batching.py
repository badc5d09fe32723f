"""Processed batches through a real server: row-wise processing a message at a time, and
messages of about ``MESSAGE_BYTES``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.engine.batching import MESSAGE_BYTES
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
