"""What a preprocessing worker process runs: its own plugins, pipelines rebuilt from JSON."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from ..protocol.errors import TransformFailed
from .pipeline import Pipeline, from_spec
from .registry import Plugins

__all__ = ["initialize", "process"]

_plugins: Plugins | None = None
_pipelines: dict[str, Pipeline] = {}


def initialize(modules_dir: str | None) -> None:
    """Load the server's plugins in this worker (built-ins, entry points, modules folder)."""
    global _plugins
    # the server reported the modules that failed to load; workers need not say it again
    logging.getLogger("lavender_flight").addHandler(logging.NullHandler())
    _plugins = Plugins.load(modules_dir)


def process(spec: str, batch: pa.RecordBatch) -> tuple[pa.RecordBatch | None, Any, str | None]:
    """Collate and preprocess one batch: ``(result, failed rows, error message)``."""
    pipeline = _pipelines.get(spec)
    if pipeline is None:
        assert _plugins is not None, "initialize() first"
        pipeline = _pipelines[spec] = from_spec(_plugins, json.loads(spec))
    try:
        outcome = pipeline.process(batch)
    except TransformFailed as exc:
        return None, np.zeros(0, dtype=np.int64), str(exc)
    return outcome.result, outcome.failed, None
