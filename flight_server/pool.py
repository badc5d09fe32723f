"""Worker processes that collate and preprocess batches, so remote preprocessing uses every core."""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import pyarrow as pa

from ..protocol.errors import TransformFailed
from ..transforms import Outcome
from ..transforms import worker as transform_worker

__all__ = ["TransformPool"]

log = logging.getLogger(__name__)


class TransformPool:
    """A pool of ``workers`` processes; each loads the same plugins as the server.

    Started on first use, with ``spawn``: gRPC does not survive ``fork``.
    """

    def __init__(
        self, workers: int, modules_dir: str | None, min_row_seconds: float = 20e-6
    ) -> None:
        self.workers = workers
        self.min_row_seconds = min_row_seconds
        """Work per row below which a batch is cheaper to process than to send to a worker."""
        self.modules_dir = modules_dir
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=transform_worker.initialize,
                initargs=(self.modules_dir,),
            )
            log.info("started %d preprocessing workers", self.workers)
        return self._executor

    def submit(
        self, spec: str, batch: pa.RecordBatch
    ) -> Future[tuple[pa.RecordBatch | None, np.ndarray, str | None]]:
        """Queue one batch; the future holds ``(result, failed rows, error)``."""
        return self._pool().submit(transform_worker.process, spec, batch)

    @staticmethod
    def outcome(future: Future[tuple[pa.RecordBatch | None, np.ndarray, str | None]]) -> Outcome:
        """The result of a submitted batch (raises ``TransformFailed`` as the worker did)."""
        result, failed, error = future.result()
        if error is not None:
            raise TransformFailed(error)
        return Outcome(result, failed)

    def close(self) -> None:
        """Stop the workers."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
