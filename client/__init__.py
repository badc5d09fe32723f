"""The Python client of Lavender Flight: ``from lavender_flight.client import api as lavender``."""

from __future__ import annotations

from ..catalog import errors
from . import api
from .connection import LavenderClient
from .iteration import Iteration
from .writer import Writer

__all__ = ["Iteration", "LavenderClient", "Writer", "api", "errors"]
