"""Real CPU work for a torch ``DataLoader``'s collate function, the same with 0 or n workers.

:class:`TokenizeAndHash` stands for what a training job's collate does per batch: every
row's text is byte-tokenized into a padded ``int32`` row of ``input_ids`` and hashed
(a chain of SHA-256 rounds, say for dedup keys), all in Python per row. With the default
``rounds=32`` that is about 9 us a row here (``python -m benchmarks.work`` prints it), near
what a fast tokenizer costs on a 100-character text. It is a module of its own so that spawned
``DataLoader`` workers import it (and only it) to unpickle the collate.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np


class TokenizeAndHash:
    """A collate that does per-row CPU work on the batch a ``LavenderDataLoader`` yields.

    ``LavenderDataLoader`` hands its collate ``(batch, token)`` items (its own collate is
    the identity, see ``client/torch_loader.py``); this one keeps that shape and adds
    ``input_ids`` (rows x ``length`` int32) and ``digest`` (int64) to the batch.
    """

    def __init__(self, column: str = "text", length: int = 128, rounds: int = 32) -> None:
        self.column = column
        self.length = length
        self.rounds = rounds

    def work(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with ``input_ids`` and ``digest`` added (the CPU work itself)."""
        import torch

        texts = batch[self.column]
        ids = np.zeros((len(texts), self.length), dtype=np.int32)
        digests = np.empty(len(texts), dtype=np.int64)
        for row, text in enumerate(texts):
            raw = text.encode()[: self.length]
            ids[row, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            value = raw
            for _ in range(self.rounds):
                value = hashlib.sha256(value).digest()
            digests[row] = int.from_bytes(value[:8], "little", signed=True)
        return {**batch, "input_ids": torch.from_numpy(ids), "digest": torch.from_numpy(digests)}

    def __call__(self, item: Any) -> Any:
        if isinstance(item, tuple):
            batch, *rest = item
            return (self.work(batch), *rest)
        return self.work(item)


def cost_per_row_us(rows: int = 20_000, **options: Any) -> float:
    """Microseconds of :meth:`TokenizeAndHash.work` per 100-character row, measured here."""
    texts = ["x" * 100] * rows
    collate = TokenizeAndHash(**options)
    collate.work({"text": texts[:16]})  # imports torch outside the timing
    start = time.perf_counter()
    for offset in range(0, rows, 1024):
        collate.work({"text": texts[offset : offset + 1024]})
    return (time.perf_counter() - start) / rows * 1e6


if __name__ == "__main__":
    print(f"TokenizeAndHash: {cost_per_row_us():.1f} us a row")
