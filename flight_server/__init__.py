"""The Lavender Flight server: Arrow Flight over the catalog, shard storage and transforms."""

# ruff: noqa: E402  (the allocator's environment is set before any import loads pyarrow)

from __future__ import annotations

from .preload import allocator_environment

allocator_environment()  # before anything below loads pyarrow

from .cli import main, serve
from .demo import DEMO_DATASET, create_demo
from .errors import to_flight_error, translate_errors, wire_errors
from .locations import Locations
from .policy import StoragePolicy
from .reading import DatasetReader
from .server import ACTIONS, LavenderFlightServer
from .service import LavenderService
from .settings import ServerSettings
from .shard_io import ShardIO
from .storage import Location, resolve_location

__all__ = [
    "ACTIONS",
    "DEMO_DATASET",
    "DatasetReader",
    "LavenderFlightServer",
    "LavenderService",
    "Location",
    "Locations",
    "ServerSettings",
    "ShardIO",
    "StoragePolicy",
    "create_demo",
    "main",
    "resolve_location",
    "serve",
    "to_flight_error",
    "translate_errors",
    "wire_errors",
]
