"""Iteration payloads of the wire: the server's fast metadata encoder against the model."""

from __future__ import annotations

import random

import numpy as np

from lavender_flight.protocol.iterations import (
    BatchMetadata,
    batch_metadata_json,
    decode_positions,
    encode_positions,
)


def test_the_fast_batch_metadata_is_what_the_model_would_say() -> None:
    rng = random.Random(1)
    for _ in range(200):
        batches = [
            (
                rng.randint(0, 1024),
                [
                    (a, a + rng.randint(1, 64))
                    for a in sorted(rng.sample(range(10_000), rng.randint(1, 3)))
                ],
            )
            for _ in range(rng.randint(0, 40))
        ]
        deal = rng.choice([None, 1, 7])
        report = rng.choice([None, 1, 4096])
        positions = np.array(rng.sample(range(100_000), rng.randint(1, 50)), dtype=np.int64)
        extra = rng.choice([None, encode_positions(positions)])
        fast = batch_metadata_json("it-x", 3, 2, batches, deal, report, extra)
        parsed = BatchMetadata.model_validate_json(fast)
        assert parsed == BatchMetadata(
            iteration_id="it-x", rank=3, epoch=2, deal=deal, batches=batches,
            report_every=report, **(extra or {}),
        )  # fmt: skip
        if extra is not None:
            assert decode_positions(parsed.model_dump()).tolist() == positions.tolist()
