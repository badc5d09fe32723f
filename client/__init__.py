"""The Python client of Lavender Flight: ``from lavender_flight.client import api as lavender``."""

from __future__ import annotations

from . import api, errors
from .connection import LavenderClient
from .features import FeatureWriter, write_feature_shardset
from .iteration import Iteration
from .writer import Writer

__all__ = [
    "FeatureWriter",
    "Iteration",
    "LavenderClient",
    "Writer",
    "api",
    "errors",
    "write_feature_shardset",
]
