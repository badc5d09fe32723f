"""Feature shardsets written from the client: computed batch by batch, resumed, from iterations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from lavender_flight.client import FeatureWriter, Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.client.features import normalize_location
from lavender_flight.protocol import Dataset, Shardset
from lavender_flight.protocol.errors import InvalidArgument, SchemaMismatch

SHARD_ROWS = [40, 25, 33]
TOTAL = sum(SHARD_ROWS)
STARTS = [0, 40, 65]  # the first uid of each shard


def text_of(uid: int) -> str:
    return "x" * (uid % 7) + f"t{uid}"


@pytest.fixture
def dataset(client: LavenderClient, data_dir: Path) -> Dataset:
    """98 samples in 3 shards of uneven sizes: uid, text."""
    ds = lavender.create_dataset("feat")
    main = lavender.create_shardset(
        ds.id,
        (data_dir / "main").as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="text", type_="str"),
        ],
    )
    writer = Writer.get(dataset_id=ds.id, shardset_id=main.id)
    for index, (start, rows) in enumerate(zip(STARTS, SHARD_ROWS, strict=True)):
        writer.write(
            [{"uid": u, "text": text_of(u)} for u in range(start, start + rows)],
            shard_index=index,
        )
    return lavender.get_dataset(dataset_id=ds.id)


def double_and_length(batch: pa.Table) -> dict[str, Any]:
    return {
        "double": pc.multiply(batch.column("uid"), 2),
        "length": pc.utf8_length(batch.column("text")),
    }


def joined(dataset: Dataset) -> dict[str, list[Any]]:
    table = lavender.read_dataset(dataset.name)
    return table.sort_by("uid").to_pydict()


def assert_aligned(dataset: Dataset, feature: Shardset) -> None:
    """Each feature shard: the index, rows and uid range of the main shard of that index."""
    main = lavender.get_dataset(dataset_id=dataset.id).main_shardset
    assert main is not None

    def stats(shardset_id: str) -> list[tuple[Any, ...]]:
        shards = lavender.list_shards(dataset.id, shardset_id)
        return [(s.index, s.num_rows, s.uid_min, s.uid_max) for s in shards]

    assert stats(feature.id) == stats(main.id)


def test_computes_columns_aligned_with_the_main_shards(
    dataset: Dataset, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    location = (data_dir / "features").as_uri()
    feature = lavender.write_feature_shardset(
        dataset.id, location, double_and_length, batch_size=16
    )
    assert [c.name for c in feature.columns] == ["uid", "double", "length"]
    assert (feature.shard_count, feature.total_samples) == (3, TOTAL)
    assert_aligned(dataset, feature)
    rows = joined(dataset)
    assert rows["uid"] == list(range(TOTAL))
    assert rows["double"] == [2 * u for u in range(TOTAL)]
    assert rows["length"] == [len(text_of(u)) for u in range(TOTAL)]
    preview = lavender.preview_dataset(dataset.id, limit=TOTAL, columns=["double", "length"])
    assert preview.column("double").to_pylist() == [2 * u for u in range(TOTAL)]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"feature shardset {location}: shard 1/3 written (40/98 rows, ")
    assert lines[2].startswith(f"feature shardset {location}: shard 3/3 written (98/98 rows, ")
    assert lines[2].endswith(" rows/s)")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda uids: [2 * u for u in uids.to_pylist()], id="list"),
        pytest.param(lambda uids: uids.to_numpy() * 2, id="numpy"),
        pytest.param(lambda uids: torch.from_numpy(uids.to_numpy() * 2), id="torch"),
        pytest.param(lambda uids: pc.multiply(uids, 2), id="arrow"),
    ],
)
def test_compute_returns_any_kind_of_column(dataset: Dataset, data_dir: Path, make: Any) -> None:
    feature = lavender.write_feature_shardset(
        dataset.id,
        (data_dir / "features").as_uri(),
        lambda batch: {"double": make(batch.column("uid"))},
        columns=[],
        progress=False,
    )
    assert [c.type_ for c in feature.columns] == ["int64", "int64"]
    assert joined(dataset)["double"] == [2 * u for u in range(TOTAL)]


def test_compute_sees_the_projected_columns_and_may_return_a_table(
    dataset: Dataset, data_dir: Path
) -> None:
    seen: list[list[str]] = []

    def compute(batch: pa.Table) -> pa.Table:
        seen.append(batch.column_names)
        vectors = np.stack([batch.column("uid").to_numpy(), -batch.column("uid").to_numpy()], 1)
        # the uids come back reversed: the helper puts the rows back in input order
        return pa.table(
            {
                "uid": batch.column("uid"),
                "vec": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 2),
            }
        ).take(pa.array(range(batch.num_rows - 1, -1, -1)))

    feature = lavender.write_feature_shardset(
        dataset.id,
        (data_dir / "vectors").as_uri(),
        compute,
        columns=["text"],
        batch_size=50,
        output_columns=[lavender.DatasetColumnOptions(name="vec", type_="list<float32>")],
        progress=False,
    )
    assert seen == [["uid", "text"]] * 3
    assert feature.columns[1].type_ == "list<item: float32>"
    assert_aligned(dataset, feature)
    assert joined(dataset)["vec"] == [[float(u), float(-u)] for u in range(TOTAL)]


def test_uids_returned_in_another_order_are_put_back(dataset: Dataset, data_dir: Path) -> None:
    def compute(batch: pa.Table) -> dict[str, Any]:
        uids = batch.column("uid").to_pylist()[::-1]
        return {"uid": uids, "double": [2 * u for u in uids]}

    feature = lavender.write_feature_shardset(
        dataset.id, (data_dir / "f").as_uri(), compute, progress=False
    )
    assert_aligned(dataset, feature)
    assert joined(dataset)["double"] == [2 * u for u in range(TOTAL)]


@pytest.mark.parametrize("fail_in_shard", [0, 2])
def test_a_rerun_after_a_crash_goes_on_where_it_stopped(
    dataset: Dataset, data_dir: Path, fail_in_shard: int, capsys: pytest.CaptureFixture[str]
) -> None:
    location = str(data_dir / "features")  # a plain path: the same folder as file://...
    calls: list[int] = []

    def compute(batch: pa.Table) -> dict[str, Any]:
        first = batch.column("uid")[0].as_py()
        calls.append(first)
        if failing and first >= STARTS[fail_in_shard] + 10:
            raise RuntimeError("out of memory")
        return {"double": pc.multiply(batch.column("uid"), 2)}

    failing = True
    with pytest.raises(RuntimeError, match="out of memory") as raised:
        lavender.write_feature_shardset(dataset.id, location, compute, batch_size=10)
    assert any(f"shard {fail_in_shard}, batch 1" in note for note in raised.value.__notes__)
    created = lavender.get_dataset(dataset_id=dataset.id).shardsets
    assert len(created) == 2
    written = lavender.list_shards(dataset.id, created[1].id)
    assert [s.index for s in written] == list(range(fail_in_shard))

    failing, calls[:] = False, []
    capsys.readouterr()
    feature = lavender.write_feature_shardset(
        dataset.id, Path(location).as_uri() + "/", compute, batch_size=10
    )
    assert feature.id == created[1].id
    assert min(calls) == STARTS[fail_in_shard]  # nothing recomputed before the failed shard
    lines = capsys.readouterr().err.splitlines()
    assert sum("skipped (already written)" in line for line in lines) == fail_in_shard
    assert_aligned(dataset, feature)
    assert joined(dataset)["double"] == [2 * u for u in range(TOTAL)]

    calls.clear()
    again = lavender.write_feature_shardset(dataset.id, location, compute, progress=False)
    assert calls == []  # all done: nothing to compute
    assert again.total_samples == TOTAL


def test_feature_writer_fed_in_order_lands_aligned(dataset: Dataset, data_dir: Path) -> None:
    iteration = Iteration.from_dataset(dataset.id, batch_size=7, shuffle=False, format="arrow")
    with FeatureWriter(dataset.id, (data_dir / "features").as_uri()) as writer:
        for batch in iteration:
            uids = batch.column("uid")
            writer.write({"uid": uids, "double": pc.multiply(uids, 2)})
    feature = writer.shardset
    assert feature is not None
    assert (feature.shard_count, feature.total_samples) == (3, TOTAL)
    assert_aligned(dataset, feature)
    assert joined(dataset)["double"] == [2 * u for u in range(TOTAL)]


def test_feature_writer_fed_in_any_order_joins_correctly(dataset: Dataset, data_dir: Path) -> None:
    iteration = Iteration.from_dataset(
        dataset.id, batch_size=7, shuffle=True, shuffle_seed=5, format="arrow"
    )
    writer = FeatureWriter(dataset.id, (data_dir / "features").as_uri())
    order = []
    for batch in iteration:
        order.extend(batch.column("uid").to_pylist())
        writer.write(
            pa.record_batch(
                {"uid": batch.column("uid"), "length": pc.utf8_length(batch.column("text"))}
            )
        )
    feature = writer.close()
    assert order != list(range(TOTAL))
    assert feature.total_samples == TOTAL
    assert joined(dataset)["length"] == [len(text_of(u)) for u in range(TOTAL)]


def test_feature_writer_rewrites_the_shardset_at_its_location(
    dataset: Dataset, data_dir: Path
) -> None:
    location = (data_dir / "features").as_uri()
    with FeatureWriter(dataset.id, location) as writer:
        writer.write({"uid": list(range(TOTAL)), "score": [0.5] * TOTAL})
    with FeatureWriter(dataset.id, location) as writer:  # fewer rows: stale shards are emptied
        writer.write({"uid": list(range(50)), "score": [1.5] * 50})
    feature = writer.shardset
    assert feature is not None
    assert feature.total_samples == 50
    assert joined(dataset)["score"] == [1.5] * 50 + [None] * (TOTAL - 50)


def test_feature_writer_keeps_what_was_written_when_the_block_raises(
    dataset: Dataset, data_dir: Path
) -> None:
    with (
        pytest.raises(RuntimeError),
        FeatureWriter(dataset.id, (data_dir / "features").as_uri()) as writer,
    ):
        writer.write({"uid": list(range(45)), "flag": [True] * 45})  # shard 0 (40) + 5 rows
        raise RuntimeError("stop")
    feature = writer.shardset
    assert feature is not None
    shards = lavender.list_shards(dataset.id, feature.id)
    assert [(s.index, s.num_rows) for s in shards] == [(0, 40)]
    with pytest.raises(InvalidArgument, match="closed"):
        writer.write({"uid": [46], "flag": [False]})


def wrong_length(batch: pa.Table) -> Any:
    return {"double": list(range(batch.num_rows - 1))}


def clashing(batch: pa.Table) -> Any:
    return {"text": batch.column("text")}


def nothing(batch: pa.Table) -> Any:
    return {}


def only_uids(batch: pa.Table) -> Any:
    return batch.select(["uid"])


def other_uids(batch: pa.Table) -> Any:
    return {"uid": pc.add(batch.column("uid"), 1), "double": batch.column("uid")}


def not_columns(batch: pa.Table) -> Any:
    return None


def scalar_column(batch: pa.Table) -> Any:
    return {"double": 3}


@pytest.mark.parametrize(
    ("compute", "error", "message"),
    [
        (wrong_length, SchemaMismatch, r"shard 0, batch 0 .*returned 15 rows for 16 input rows"),
        (clashing, InvalidArgument, r"shard 0, batch 0 .*'text' \(in shardset ss-"),
        (nothing, InvalidArgument, r"shard 0, batch 0 .*no column besides the uid 'uid'"),
        (only_uids, InvalidArgument, r"no column besides the uid"),
        (other_uids, SchemaMismatch, r"missing \[0\], unexpected \[16\]"),
        (not_columns, InvalidArgument, r"expected a pyarrow Table.*got NoneType"),
        (scalar_column, SchemaMismatch, r"column 'double'.*sequence of values, got int"),
    ],
)
def test_bad_outputs_are_refused_and_nothing_is_written(
    dataset: Dataset, data_dir: Path, compute: Any, error: type[Exception], message: str
) -> None:
    folder = data_dir / "features"
    with pytest.raises(error, match=message):
        lavender.write_feature_shardset(
            dataset.id, folder.as_uri(), compute, batch_size=16, progress=False
        )
    assert not folder.exists() or not any(folder.iterdir())
    assert len(lavender.get_dataset(dataset_id=dataset.id).shardsets) == 1


def test_a_declared_clash_is_refused_before_any_compute(dataset: Dataset, data_dir: Path) -> None:
    calls = []
    with pytest.raises(InvalidArgument, match="'text'"):
        lavender.write_feature_shardset(
            dataset.id,
            (data_dir / "features").as_uri(),
            lambda batch: calls.append(batch) or {},
            output_columns=[{"name": "text", "type": "str"}],
        )
    assert calls == []


def test_a_later_batch_of_another_type_is_refused(dataset: Dataset, data_dir: Path) -> None:
    def compute(batch: pa.Table) -> Any:
        first = batch.column("uid")[0].as_py()
        return {"value": [f"s{u}" if first >= 40 else u for u in batch.column("uid").to_pylist()]}

    with pytest.raises(SchemaMismatch, match=r"shard 1, batch 0 .*value: int64"):
        lavender.write_feature_shardset(
            dataset.id, (data_dir / "f").as_uri(), compute, progress=False
        )


def test_feature_writer_errors(dataset: Dataset, data_dir: Path) -> None:
    location = (data_dir / "features").as_uri()
    writer = FeatureWriter(dataset.id, location)
    with pytest.raises(SchemaMismatch, match="no uid column 'uid'"):
        writer.write({"double": [1, 2]})
    with pytest.raises(InvalidArgument, match=r"'text' \(in shardset"):
        writer.write({"uid": [1, 2], "text": ["a", "b"]})
    with pytest.raises(InvalidArgument, match="nothing was written"):
        writer.close()
    assert not (data_dir / "features").exists()
    main = lavender.get_dataset(dataset_id=dataset.id).main_shardset
    assert main is not None
    with pytest.raises(InvalidArgument, match="is the main shardset"):
        FeatureWriter(dataset.id, main.location)


def test_locations_compare_as_folders(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    same = [str(folder), f"{folder}/", folder.as_uri(), f"{folder.as_uri()}/", f"{folder}/./x/.."]
    assert len({normalize_location(x) for x in same}) == 1
    assert normalize_location("memory://a/b/") == normalize_location("memory:///a/b")
    assert normalize_location("s3://bucket/a") != normalize_location("s3://bucket/b")
