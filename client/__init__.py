"""The Python client of Lavender Flight: ``from lavender_flight.client import api as lavender``.

``api`` holds the module-level functions (``lavender.init(...)``, ``lavender.create_dataset``,
...) running on a default connection; :class:`LavenderClient` is one connection of your own,
made from :class:`ClientSettings`, with the same API as methods.
"""

from __future__ import annotations

from . import api, errors
from .connection import LavenderClient
from .features import FeatureWriter, write_feature_shardset
from .iteration import Iteration, MixtureSource
from .settings import ClientSettings
from .writer import Writer

__all__ = [
    "ClientSettings",
    "FeatureWriter",
    "Iteration",
    "LavenderClient",
    "MixtureSource",
    "Writer",
    "api",
    "errors",
    "write_feature_shardset",
]
