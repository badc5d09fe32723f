"""What ``acknowledging`` reports of the batches it hands the loop (repeats included)."""

from __future__ import annotations

from lavender_flight.client.acks import Acknowledger, Ranges, acknowledging


class Recorder(Acknowledger):
    """An acknowledger that records what the loop reports (no thread, no server)."""

    def __init__(self) -> None:  # nothing of the parent's: no thread, nothing sent
        self.taken: list[list[tuple[int, int]]] = []
        self.completed: list[list[tuple[int, int]]] = []
        self.closed: bool | None = None

    def take(self, ranges: Ranges) -> None:
        self.taken.append([(a, b) for a, b in ranges])

    def complete(self, ranges: Ranges) -> None:
        self.completed.append([(a, b) for a, b in ranges])

    def unsent(self) -> int:
        return 0

    def close(self, wait: bool = True) -> None:
        self.closed = wait


def test_a_batch_sent_again_is_not_yielded_twice_but_reported_taken() -> None:
    # after a reconnect the new stream sends again what the loop had not completed; it
    # counts those batches as read ahead until it hears they were taken (else its drain
    # at the end of the epoch waits for them forever)
    acks = Recorder()
    items = [("a", [(0, 10)]), ("b", [(10, 20)]), ("a again", [(0, 10)]), ("c", [(20, 30)])]
    assert list(acknowledging(items, acks)) == ["a", "b", "c"]
    assert acks.taken == [[(0, 10)], [(10, 20)], [(0, 10)], [(20, 30)]]
    assert acks.completed == [[(0, 10)], [(10, 20)], [(20, 30)]]
    assert acks.closed is True
