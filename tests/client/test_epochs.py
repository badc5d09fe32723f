"""Epochs, the way every torch user writes training: ``for epoch in range(E): for batch in
loader``. Every epoch delivers every sample once (never a silent empty pass), shuffled anew;
the same seed gives the same epochs; a job that crashes in epoch 2 resumes in epoch 2."""

from __future__ import annotations

import json
import signal
import textwrap
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from lavender_flight.client import Iteration, LavenderClient
from lavender_flight.client import api as lavender
from tests.client.test_resume import Child, children, write_dataset  # noqa: F401
from tests.client.test_torch_loader import MANY_WORKERS

TOTAL, EPOCHS, BATCH, SEED = 600, 3, 50, 11


def uids(batches: Iterable[Any]) -> list[int]:
    return [int(u) for batch in batches for u in batch["uid"]]


def three_epochs(
    make: Callable[[Iteration], Iterable[Any]], iteration: Iteration
) -> list[list[int]]:
    loader = make(iteration)
    return [uids(loader) for _ in range(EPOCHS)]


def bare(iteration: Iteration) -> Iterable[Any]:
    return iteration


def no_workers(iteration: Iteration) -> Iterable[Any]:
    return iteration.to_torch_dataloader(num_workers=0)


def two_workers(iteration: Iteration) -> Iterable[Any]:
    return iteration.to_torch_dataloader(num_workers=2)


@pytest.fixture
def dataset_id(client: LavenderClient, data_dir: Path) -> str:
    return write_dataset("epochs", data_dir / "main", shards=4, rows=TOTAL // 4)


@MANY_WORKERS
@pytest.mark.parametrize(
    "make", [bare, no_workers, two_workers], ids=["iteration", "loader-0", "loader-2"]
)
def test_every_epoch_is_a_full_pass_shuffled_anew_and_the_seed_repeats_them(
    dataset_id: str, make: Callable[[Iteration], Iterable[Any]]
) -> None:
    def run(name: str) -> list[list[int]]:
        iteration = Iteration.from_dataset(
            dataset_id, batch_size=BATCH, shuffle=True, shuffle_seed=SEED, iteration_id=name
        )
        return three_epochs(make, iteration)

    first = run("a")
    for epoch in first:
        assert sorted(epoch) == list(range(TOTAL)), "an epoch lost or repeated samples"
    assert len({tuple(epoch) for epoch in first}) == EPOCHS, "two epochs in the same order"
    assert run("b") == first, "the same seed gave other epochs"
    progress = lavender.get_iteration("a")
    assert (progress.epoch, progress.completed, progress.done) == (EPOCHS - 1, TOTAL, True)


@pytest.mark.slow
def test_a_crash_in_epoch_two_resumes_in_epoch_two(
    dataset_id: str,
    api_url: str,
    tmp_path: Path,
    children: list[Child],  # noqa: F811
) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys, time
            from lavender_flight.client import Iteration
            from lavender_flight.client import api as lavender

            url, dataset_id = sys.argv[1:3]
            lavender.init(url, timeout=10)
            iteration = Iteration.from_dataset(
                dataset_id, batch_size=50, shuffle=True, shuffle_seed=11, iteration_id="crashy"
            )
            for epoch in range(3):
                for count, batch in enumerate(iteration):
                    print(json.dumps([epoch, batch["uid"]]), flush=True)
                    if epoch == 2 and count >= 4:
                        time.sleep(60)  # stuck in a step until it is killed
            """
        )
    )
    child = Child(script, [api_url, dataset_id], tmp_path / "train.log")
    children.append(child)
    batches_per_epoch = TOTAL // BATCH
    lines = child.read_batches(2 * batches_per_epoch + 5)
    time.sleep(1.0)  # stuck in its step: its background thread sends what it completed
    child.kill()
    assert child.process.returncode == -signal.SIGKILL
    epochs = [epoch for epoch, _ in lines]
    assert epochs == [0] * batches_per_epoch + [1] * batches_per_epoch + [2] * 5
    seen_in_two = [u for epoch, batch in lines if epoch == 2 for u in batch]

    resumed = Iteration.resume("crashy")  # a new process of the same job
    rest = uids(resumed)
    assert resumed.epoch == 2, "the resume did not continue the epoch the job was in"
    again = set(seen_in_two) & set(rest)
    assert len(again) == BATCH, f"{len(again)} samples of epoch 2 delivered twice"  # in hand
    assert sorted(set(seen_in_two) | set(rest)) == list(range(TOTAL))
    assert len(rest) == len(set(rest))
    # and its order is epoch 2's: an uninterrupted run of the same seed agrees
    clean = Iteration.from_dataset(
        dataset_id, batch_size=BATCH, shuffle=True, shuffle_seed=SEED, iteration_id="clean"
    )
    clean_epochs = three_epochs(bare, clean)
    assert [u for u in clean_epochs[2] if u in set(rest)] == rest
    assert json.dumps(clean_epochs[2][: len(seen_in_two)]) == json.dumps(seen_in_two)
