"""Remote preprocessing end to end: plugins from a modules folder, run by a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.flight_server import LavenderFlightServer, LavenderService
from lavender_flight.flight_server.engine import RankState
from lavender_flight.protocol import Dataset
from lavender_flight.protocol.errors import InvalidArgument, SchemaMismatch, TransformFailed
from lavender_flight.protocol.ranges import RangeSet
from lavender_flight.transforms import Plugins

MODULES = {
    "custom_filter.py": """
from lavender_flight.transforms import Filter

class UidModFilter(Filter, name="uid_mod"):
    def filter(self, sample: dict, *, mod: int = 2) -> bool:
        return sample["uid"] % self.mod == 0
""",
    "custom_steps.py": '''
import pyarrow as pa
import pyarrow.compute as pc
from lavender_flight.transforms import Collater, Filter, Preprocessor

calls = {"flaky": 0}


class EvenLabel(Filter, name="even_label"):
    """Keeps even labels (vectorized)."""

    def filter_batch(self, batch, *, column: str = "label"):
        return pc.equal(pc.bit_wise_and(batch.column(column), 1), 0)


class TextLength(Preprocessor, name="text_length"):
    """Adds the text's length."""

    def process(self, batch, *, column: str = "text"):
        return batch.append_column("length", pc.utf8_length(batch.column(column)))


class Doubled(Preprocessor, name="doubled"):
    depends_on = ("text_length",)

    def process_sample(self, sample, *, factor: int = 2):
        return {**sample, "length": sample["length"] * factor}


class Picky(Preprocessor, name="picky"):
    """Fails on uids divisible by 50."""

    def process(self, batch):
        if any(u % 50 == 0 for u in batch.column("uid").to_pylist()):
            raise ValueError("uid divisible by 50")
        return batch


class Flaky(Preprocessor, name="flaky"):
    def process(self, batch, *, fail_times: int = 2):
        calls["flaky"] += 1
        if calls["flaky"] <= fail_times:
            raise ConnectionError("transient")
        return batch


class CountCollater(Collater, name="count"):
    def collate(self, samples):
        return {"uid": [s["uid"] for s in samples], "size": [len(samples)] * len(samples)}
''',
    "broken.py": "raise RuntimeError('this module is broken')\n",
}
TOTAL = 300


@pytest.fixture
def modules_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "modules"
    folder.mkdir()
    for name, text in MODULES.items():
        (folder / name).write_text(text)
    return folder


def start(
    catalog: Catalog,
    modules_dir: Path,
    workers: int,
    servers: list[LavenderFlightServer] | None = None,
) -> Iterator[str]:
    server = LavenderFlightServer(
        LavenderService(catalog), plugins=Plugins.load(modules_dir), workers=workers
    )
    if server.iterations.pool is not None:
        server.iterations.pool.min_row_seconds = 0.0  # cheap test plugins: use the pool anyway
    if servers is not None:
        servers.append(server)
    conn = lavender.init(f"grpc://127.0.0.1:{server.port}", timeout=60)
    try:
        yield f"grpc://127.0.0.1:{server.port}"
    finally:
        conn.close()
        lavender._client = None
        server.shutdown()


@pytest.fixture
def plugin_server(catalog: Catalog, modules_dir: Path) -> Iterator[str]:
    yield from start(catalog, modules_dir, workers=0)


def make_dataset(data_dir: Path) -> Dataset:
    dataset = lavender.create_dataset("transformed")
    shardset = lavender.create_shardset(
        dataset.id,
        data_dir.as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="text", type_="str"),
            lavender.DatasetColumnOptions(name="label", type_="int32"),
        ],
    )
    writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset.id)
    for index in range(3):
        uids = range(index * 100, index * 100 + 100)
        writer.write(
            [{"uid": u, "text": "x" * (u % 13), "label": u % 5} for u in uids], shard_index=index
        )
    return dataset


@pytest.fixture
def dataset(plugin_server: str, data_dir: Path) -> Dataset:
    return make_dataset(data_dir)


def everything(iteration: Iteration) -> list[dict]:
    return [row for batch in iteration for row in pa.Table.from_pydict(batch).to_pylist()]


def test_seed_filter_from_the_modules_folder(dataset: Dataset, catalog: Catalog) -> None:
    it = Iteration.from_dataset(
        dataset.id, batch_size=16, shuffle=True, shuffle_seed=3, filters=[("uid_mod", {"mod": 3})]
    )
    batches = list(it)
    uids = [u for b in batches for u in b["uid"]]
    assert sorted(uids) == list(range(0, TOTAL, 3))  # exactly once, only those kept
    assert all(len(b["uid"]) == 16 for b in batches[:-1])  # full batches despite filtering
    progress = lavender.get_iteration(it.id)
    assert (progress.completed, progress.filtered, progress.failed) == (100, 200, 0)
    assert progress.done
    # batches span the samples filtered on their way: progress stays one range, not 200
    (row,) = catalog.load_rank_states(it.id)
    saved = RankState.from_json(row.state or "")
    assert saved.finished == RangeSet([(0, TOTAL)]) and saved.filtered == 200
    assert len(row.state or "") < 1000


def test_vectorized_filters_combine(dataset: Dataset) -> None:
    it = Iteration.from_dataset(
        dataset.id, batch_size=10, filters=["even_label", ("expression", {"expr": "uid < 100"})]
    )
    rows = everything(it)
    assert [r["uid"] for r in rows] == [u for u in range(100) if (u % 5) % 2 == 0]
    assert lavender.get_iteration(it.id).filtered == TOTAL - len(rows)


def test_preprocessors_add_columns_in_dependency_order(dataset: Dataset) -> None:
    it = Iteration.from_dataset(
        dataset.id, batch_size=32, preprocessors=[("doubled", {"factor": 3}), "text_length"]
    )
    assert it.schema.names == ["uid", "text", "label", "length"]
    rows = everything(it)
    assert len(rows) == TOTAL
    assert all(r["length"] == 3 * (r["uid"] % 13) for r in rows)


def test_collater(dataset: Dataset) -> None:
    it = Iteration.from_dataset(dataset.id, batch_size=64, collater="count")
    batches = list(it)
    assert [b["size"][0] for b in batches] == [64, 64, 64, 64, 44]
    assert list(batches[0]) == ["uid", "size"]


def test_builtin_tokenizer_to_torch(dataset: Dataset) -> None:
    it = Iteration.from_dataset(
        dataset.id,
        batch_size=8,
        format="torch",
        preprocessors=[("byte_tokenize", {"max_length": 16, "drop": True})],
    )
    batch = next(iter(it))
    assert tuple(batch["input_ids"].shape) == (8, 16)
    assert batch["input_ids_mask"].sum(dim=1).tolist() == [u % 13 for u in range(8)]


def test_typos_fail_when_the_iteration_is_created(dataset: Dataset) -> None:
    with pytest.raises(InvalidArgument, match=r"no filter named 'uid_mood'; filters: .*uid_mod"):
        Iteration.from_dataset(dataset.id, batch_size=8, filters=["uid_mood"])
    with pytest.raises(InvalidArgument, match=r"filter 'uid_mod' has no parameter 'modd'"):
        Iteration.from_dataset(dataset.id, batch_size=8, filters=[("uid_mod", {"modd": 2})])
    with pytest.raises(InvalidArgument, match=r"depends on 'text_length'"):
        Iteration.from_dataset(dataset.id, batch_size=8, preprocessors=["doubled"])
    assert lavender.list_iterations(dataset.id) == []


def test_skip_on_failure_counts_exactly(dataset: Dataset) -> None:
    it = Iteration.from_dataset(
        dataset.id, batch_size=20, preprocessors=["picky"], skip_on_failure=True
    )
    uids = [u for b in it for u in b["uid"]]
    assert sorted(uids) == [u for u in range(TOTAL) if u % 50]
    progress = lavender.get_iteration(it.id)
    assert (progress.completed, progress.failed, progress.filtered) == (294, 6, 0)
    assert progress.done


def test_failure_without_skip_names_plugin_and_sample(dataset: Dataset) -> None:
    it = Iteration.from_dataset(
        dataset.id, batch_size=20, preprocessors=["picky"], max_retry_count=1
    )
    with pytest.raises(
        TransformFailed,
        match=r"^preprocessor 'picky' failed on sample uid=0: ValueError: uid divisible by 50 "
        r"\(after 2 tries",
    ):
        list(it)


def test_retries(dataset: Dataset) -> None:
    with_retries = Iteration.from_dataset(
        dataset.id, batch_size=100, preprocessors=["flaky"], max_retry_count=2
    )
    assert sum(len(b["uid"]) for b in with_retries) == TOTAL
    assert lavender.get_iteration(with_retries.id).failed == 0


def test_unreadable_shard_follows_the_policy(dataset: Dataset, data_dir: Path) -> None:
    shard = data_dir / "shard.00000001.parquet"
    shard.write_bytes(b"not parquet at all")
    skipping = Iteration.from_dataset(dataset.id, batch_size=32, skip_on_failure=True)
    uids = [u for b in skipping for u in b["uid"]]
    assert sorted(uids) == [*range(100), *range(200, 300)]
    progress = lavender.get_iteration(skipping.id)
    assert (progress.completed, progress.failed, progress.done) == (200, 100, True)
    strict = Iteration.from_dataset(dataset.id, batch_size=32)
    with pytest.raises(SchemaMismatch, match=r"^cannot read shard .*shard\.00000001\.parquet"):
        list(strict)


def test_list_plugins_and_broken_modules(dataset: Dataset, modules_dir: Path) -> None:
    listed = lavender.list_plugins()
    by_name = {(p.kind, p.name): p for p in listed.plugins}
    assert ("filter", "uid_mod") in by_name and ("collater", "count") in by_name
    assert [p.model_dump() for p in by_name[("filter", "uid_mod")].parameters] == [
        {"name": "mod", "type": "int", "default": 2, "required": False}
    ]
    assert by_name[("preprocessor", "text_length")].doc == "Adds the text's length."
    assert by_name[("preprocessor", "doubled")].depends_on == ["text_length"]
    (problem,) = listed.problems
    assert problem.startswith(str(modules_dir / "broken.py")) and "this module is broken" in problem


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(
    catalog: Catalog, modules_dir: Path, data_dir: Path
) -> None:
    def run() -> list[list[int]]:
        dataset = lavender.get_dataset(name="transformed")
        it = Iteration.from_dataset(
            dataset.id,
            batch_size=16,
            shuffle=True,
            shuffle_seed=5,
            filters=[("uid_mod", {"mod": 2})],
            preprocessors=["text_length", "picky"],
            skip_on_failure=True,
        )
        return [list(zip(b["uid"], b["length"], strict=True)) for b in it]

    served = start(catalog, modules_dir, workers=0)
    next(served)
    make_dataset(data_dir)
    inline = run()
    served.close()
    servers: list[LavenderFlightServer] = []
    pooled_server = start(catalog, modules_dir, workers=2, servers=servers)
    next(pooled_server)
    pooled = run()
    pool = servers[0].iterations.pool
    assert pool is not None and pool.answered > 0  # the worker processes ran
    pooled_server.close()
    assert pooled == inline
    assert sorted(u for b in inline for u, _ in b) == [u for u in range(0, TOTAL, 2) if u % 50]
