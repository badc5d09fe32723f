"""Iteration payloads of the wire: the server's fast metadata encoder against the model."""

from __future__ import annotations

import random

import numpy as np

from lavender_flight.protocol import wire
from lavender_flight.protocol.iterations import (
    BatchMetadata,
    IterationTicket,
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


def test_a_ticket_without_runs_reads_as_before_runs_existed() -> None:
    # a server of the version before refuses fields it does not know: a ticket that deals
    # a rank's batches one at a time (the default) does not name worker_chunks
    plain = IterationTicket(iteration_id="it-1", worker=1, num_workers=2)
    assert b"worker_chunks" not in wire.encode(plain)
    assert IterationTicket.model_validate_json(wire.encode(plain)) == plain
    runs = plain.model_copy(update={"worker_chunks": 16})
    assert b'"worker_chunks":16' in wire.encode(runs)
    assert IterationTicket.model_validate_json(wire.encode(runs)).worker_chunks == 16
