"""The demo dataset ``--demo`` serves: two joinable shardsets a new user can look at at once."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pyarrow as pa

from ..protocol import ColumnOptions, Dataset
from ..protocol.errors import DatasetNotFound
from .service import LavenderService

__all__ = ["DEMO_DATASET", "create_demo"]

log = logging.getLogger(__name__)

DEMO_DATASET = "demo"
_WORDS = (
    "lavender flight arrow shard batch sample join stream shuffle epoch rank train model "
    "data column feature uid filter collate preprocess resume server client"
).split()


def create_demo(service: LavenderService, home: Path, rows: int = 5000, shards: int = 5) -> Dataset:
    """Create the demo dataset under ``home/demo`` unless it exists; return it.

    Shardset ``main`` holds ``uid, text, label``; shardset ``features`` adds ``length`` and
    ``score`` for the same uids (written aligned, as a feature job would).
    """
    home = home.resolve()
    try:
        existing = service.get_dataset(name=DEMO_DATASET)
    except DatasetNotFound:
        pass
    else:
        complete = len(existing.shardsets) == 2 and all(
            s.total_samples == rows for s in existing.shardsets
        )
        if complete:
            return existing
        log.warning("the demo dataset is incomplete (an earlier start failed): recreating it")
        service.delete_dataset(existing.id)
    dataset = service.create_dataset(DEMO_DATASET, "uid")
    try:
        return _fill_demo(service, dataset, home, rows, shards)
    except BaseException:
        service.delete_dataset(dataset.id)
        raise


def _fill_demo(
    service: LavenderService, dataset: Dataset, home: Path, rows: int, shards: int
) -> Dataset:
    rng = random.Random(7)
    main = service.create_shardset(
        dataset.id,
        (home / "demo" / "main").as_uri(),
        [
            ColumnOptions(name="uid", type_="int", description="Sample id"),
            ColumnOptions(name="text", type_="str", description="A short sentence"),
            ColumnOptions(name="label", type_="int32", description="Class, 0-9"),
        ],
    )
    features = service.create_shardset(
        dataset.id,
        (home / "demo" / "features").as_uri(),
        [
            ColumnOptions(name="uid", type_="int", description="Sample id"),
            ColumnOptions(name="length", type_="int32", description="Characters in text"),
            ColumnOptions(name="score", type_="float32", description="A quality score"),
        ],
    )
    per_shard = -(-rows // shards)
    for index in range(shards):
        uids = list(range(index * per_shard, min(rows, (index + 1) * per_shard)))
        texts = [" ".join(rng.choices(_WORDS, k=rng.randint(3, 12))) for _ in uids]
        service.write_shard(
            dataset.id,
            main.id,
            index,
            pa.table(
                {
                    "uid": pa.array(uids, pa.int64()),
                    "text": texts,
                    "label": pa.array([uid % 10 for uid in uids], pa.int32()),
                }
            ),
            overwrite=True,
        )
        service.write_shard(
            dataset.id,
            features.id,
            index,
            pa.table(
                {
                    "uid": pa.array(uids, pa.int64()),
                    "length": pa.array([len(t) for t in texts], pa.int32()),
                    "score": pa.array([rng.random() for _ in uids], pa.float32()),
                }
            ),
            overwrite=True,
        )
    log.info("created demo dataset %r (%d rows) under %s", DEMO_DATASET, rows, home / "demo")
    return service.get_dataset(dataset_id=dataset.id)
