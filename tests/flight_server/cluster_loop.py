"""One rank's training loop for the several-machines tests, run as a process of its own.

    python cluster_loop.py '{"urls": [...], "dataset_id": ..., "iteration_id": ..., "rank": 0,
                             "world_size": 4, "batch_size": 25, "seed": 1, "pause": 0.05}'

It loops over its rank through the nodes' URLs (``lavender.init`` with all of them) as a
training job does, and prints one JSON line: the uids its loop got, how many samples its
streams sent again (after a node went away) and how many of those the servers had already
recorded as completed (which must never happen).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender
from lavender_flight.client.acks import Acknowledger
from lavender_flight.protocol.iterations import AckBody, IterationTicket
from lavender_flight.protocol.ranges import RangeSet


class RecordingAcknowledger(Acknowledger):
    """Remembers the completed ranges a server confirmed recording."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.confirmed = RangeSet()
        self.confirmed_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _send(self, body: AckBody) -> None:
        super()._send(body)
        with self.confirmed_lock:
            for start, stop in body.completed:
                self.confirmed.add(start, stop)

    def recorded(self, seq: list[tuple[int, int]]) -> bool:
        with self.confirmed_lock:
            return all(not self.confirmed.gaps(a, b) for a, b in seq)


class CountingIteration(Iteration):
    """Counts what its streams send again, and what of that was recorded as completed."""

    acknowledger_class = RecordingAcknowledger
    resent = 0
    resent_recorded = 0

    def batches(
        self, ticket: IterationTicket, acks: Acknowledger, format: str | None = None
    ) -> Iterator[tuple[Any, list[tuple[int, int]]]]:
        assert isinstance(acks, RecordingAcknowledger)
        received = RangeSet()
        for batch, seq in super().batches(ticket, acks, format):
            if seq and all(not received.gaps(a, b) for a, b in seq):
                rows = sum(b - a for a, b in seq)
                self.resent += rows
                if acks.recorded(seq):
                    self.resent_recorded += rows
            for a, b in seq:
                received.add(a, b)
            yield batch, seq


def main(args: dict[str, Any]) -> None:
    lavender.init(api_url=args["urls"], timeout=10, reconnect_seconds=45)
    iteration = CountingIteration.from_dataset(
        args["dataset_id"],
        batch_size=args["batch_size"],
        shuffle=True,
        shuffle_seed=args["seed"],
        world_size=args["world_size"],
        rank=args["rank"],
        iteration_id=args["iteration_id"],
    )
    uids: list[int] = []
    started = time.monotonic()
    for batch in iteration:
        uids.extend(batch["uid"])
        time.sleep(args["pause"])
    print(
        json.dumps(
            {
                "rank": args["rank"],
                "uids": uids,
                "resent": iteration.resent,
                "resent_recorded": iteration.resent_recorded,
                "seconds": round(time.monotonic() - started, 2),
                "first_location": iteration.locations[0],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
