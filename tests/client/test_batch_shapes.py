"""Batches of one category (the categorizer) and single samples (``batch_size=0``), end to end.

The dataset's text of sample ``u`` has ``u % 50`` characters, so its length bucket is known
from its uid.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pytest

from lavender_flight.catalog import Catalog
from lavender_flight.client import Iteration, Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient
from lavender_flight.protocol.errors import InvalidArgument
from tests.client.test_transforms import start

TOTAL = 2000
BOUNDARIES = [10, 25, 40]

CATEGORIZERS = '''
from lavender_flight.transforms import Categorizer


class Parity(Categorizer, name="parity"):
    """The seed's per-sample form: even or odd uids."""

    def categorize(self, sample, *, labels: bool = True):
        return "even" if sample["uid"] % 2 == 0 else "odd"
'''


def bucket(uid: int) -> int:
    return sum((uid % 50) >= b for b in BOUNDARIES)


def make_dataset(folder: Path) -> str:
    """2,000 samples in 4 shards: uid, and a text of ``uid % 50`` characters."""
    dataset = lavender.create_dataset("shapes")
    shardset = lavender.create_shardset(
        dataset.id,
        folder.as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="text", type_="str"),
        ],
    )
    writer = Writer.get(dataset_id=dataset.id, shardset_id=shardset.id)
    for index in range(4):
        uids = range(index * 500, (index + 1) * 500)
        writer.write([{"uid": u, "text": "x" * (u % 50)} for u in uids], shard_index=index)
    return dataset.id


@pytest.fixture
def dataset_id(client: LavenderClient, data_dir: Path) -> str:
    return make_dataset(data_dir / "shapes")


def batches_of(iteration: Iteration) -> list[list[int]]:
    return [list(batch["uid"]) for batch in iteration]


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_batch_holds_one_length_bucket_and_every_sample_once(
    dataset_id: str, shuffle: bool
) -> None:
    iteration = Iteration.from_dataset(
        dataset_id,
        batch_size=32,
        shuffle=shuffle,
        shuffle_seed=4,
        categorizer=("bucket", {"column": "text", "boundaries": BOUNDARIES}),
        iteration_id=f"buckets-{shuffle}",
    )
    batches = batches_of(iteration)
    for batch in batches:
        assert len({bucket(u) for u in batch}) == 1, batch
    uids = [u for b in batches for u in b]
    assert sorted(uids) == list(range(TOTAL))
    partial = Counter(bucket(b[0]) for b in batches if len(b) < 32)
    assert set(partial.values()) <= {1}  # at most one partial batch per category
    progress = lavender.get_iteration(f"buckets-{shuffle}")
    assert (progress.completed, progress.filtered, progress.done) == (TOTAL, 0, True)


def test_the_same_seed_makes_the_same_batches(dataset_id: str) -> None:
    def run(seed: int) -> list[list[int]]:
        return batches_of(
            Iteration.from_dataset(
                dataset_id,
                batch_size=20,
                shuffle=True,
                shuffle_seed=seed,
                categorizer=("bucket", {"column": "text", "boundaries": BOUNDARIES}),
            )
        )

    first = run(8)
    assert run(8) == first
    assert run(9) != first


def test_drop_last_drops_each_partial_bucket_as_filtered(dataset_id: str) -> None:
    iteration = Iteration.from_dataset(
        dataset_id,
        batch_size=30,
        categorizer=("bucket", {"column": "text", "boundaries": BOUNDARIES}),
        filters=[("expression", {"expr": "uid % 7 != 0"})],
        drop_last=True,
        iteration_id="buckets-drop",
    )
    batches = batches_of(iteration)
    assert all(len(b) == 30 for b in batches)
    assert all(len({bucket(u) for u in b}) == 1 for b in batches)
    uids = [u for b in batches for u in b]
    assert len(set(uids)) == len(uids) and all(u % 7 for u in uids)
    progress = lavender.get_iteration("buckets-drop")
    assert progress.done and progress.completed == len(uids)
    assert progress.total == TOTAL // 30 * 30  # drop_last: whole batches of the epoch
    assert progress.completed + progress.filtered == progress.total


def test_a_categorizer_from_the_modules_folder_runs_in_a_worker(
    catalog: Catalog, tmp_path: Path, reset_client: None
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "categories.py").write_text(CATEGORIZERS)
    for _ in start(catalog, modules, workers=1):
        dataset_id = make_dataset(tmp_path / "shapes")
        batches = batches_of(
            Iteration.from_dataset(dataset_id, batch_size=50, shuffle=True, categorizer="parity")
        )
        assert all(len({u % 2 for u in b}) == 1 for b in batches)
        assert sorted(u for b in batches for u in b) == list(range(TOTAL))
        names = [(p.kind, p.name) for p in lavender.list_plugins().plugins]
        assert ("categorizer", "parity") in names and ("categorizer", "bucket") in names


def test_categorizers_that_cannot_work_are_refused(dataset_id: str) -> None:
    cases = [
        (("size", {}), "no categorizer named 'size'; categorizers: bucket"),
        (("bucket", {"column": "text", "boundaries": [5, 3]}), "must ascend strictly"),
        (("bucket", {"column": "nope", "boundaries": [5]}), "unknown column 'nope'"),
        (("bucket", {"boundaries": [5]}), "column: Field required"),
    ]
    for categorizer, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            Iteration.from_dataset(dataset_id, batch_size=8, categorizer=categorizer)
    with pytest.raises(InvalidArgument, match="give batch_size >= 1"):
        Iteration.from_dataset(
            dataset_id, batch_size=0, categorizer=("bucket", {"column": "uid", "boundaries": [1]})
        )


# -- single samples ----------------------------------------------------------------------


def test_batch_size_0_yields_single_samples(dataset_id: str) -> None:
    iteration = Iteration.from_dataset(
        dataset_id, batch_size=0, shuffle=True, shuffle_seed=2, iteration_id="singles"
    )
    samples = list(iteration)
    assert all(isinstance(s, dict) and isinstance(s["uid"], int) for s in samples)
    assert sorted(s["uid"] for s in samples) == list(range(TOTAL))
    assert all(s["text"] == "x" * (s["uid"] % 50) for s in samples)
    progress = lavender.get_iteration("singles")
    assert (progress.completed, progress.done) == (TOTAL, True)
    assert len(iteration) == TOTAL and iteration.spec.batch_size == 0
    numpy = list(islice(iter(Iteration.from_dataset(dataset_id, batch_size=0, format="numpy")), 3))
    assert [int(s["uid"]) for s in numpy] == [0, 1, 2]


def test_single_samples_resume_from_the_group_the_loop_left(dataset_id: str) -> None:
    iteration = Iteration.from_dataset(dataset_id, batch_size=0, iteration_id="singles-resume")
    stream: Iterator[dict] = iter(iteration)
    first = [next(stream)["uid"] for _ in range(100)]
    stream.close()  # in the middle of the second group of 64
    assert lavender.get_iteration("singles-resume").completed == 64
    rest = [s["uid"] for s in Iteration.resume("singles-resume", rank=0)]
    assert rest == list(range(64, TOTAL))  # the group it left comes again, whole
    assert first == list(range(100))


def test_single_samples_through_the_torch_loader(dataset_id: str) -> None:
    loader = Iteration.from_dataset(dataset_id, batch_size=0).to_torch_dataloader()
    samples = list(loader)
    assert len(samples) == TOTAL and int(samples[5]["uid"]) == 5
