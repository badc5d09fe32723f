"""Transforms run on the server: ``Filter``, ``Collater``, ``Preprocessor``, ``Categorizer``.

Write one by subclassing with a name::

    from lavender_flight.transforms import Filter

    class UidModFilter(Filter, name="uid_mod"):
        def filter(self, sample: dict, *, mod: int = 2) -> bool:
            return sample["uid"] % self.mod == 0

and put the file in the server's modules folder (``--modules-dir``).
"""

from __future__ import annotations

from .base import BrokenContract, Categorizer, Collater, Filter, Parameter, Plugin, Preprocessor
from .limits import DEFAULT_PLUGIN_TIMEOUT, CallTimedOut, abandoned_calls
from .pipeline import Outcome, Pipeline, PluginBroken, PluginFailed, PluginTimedOut, Step
from .registry import ENTRY_POINT_GROUPS, PluginInfo, Plugins, Registry

__all__ = [
    "DEFAULT_PLUGIN_TIMEOUT",
    "ENTRY_POINT_GROUPS",
    "BrokenContract",
    "CallTimedOut",
    "Categorizer",
    "Collater",
    "Filter",
    "Outcome",
    "Parameter",
    "Pipeline",
    "Plugin",
    "PluginBroken",
    "PluginFailed",
    "PluginInfo",
    "PluginTimedOut",
    "Plugins",
    "Preprocessor",
    "Registry",
    "Step",
    "abandoned_calls",
]
