"""Transforms run on the server: ``Filter``, ``Collater``, ``Preprocessor`` plugins.

Write one by subclassing with a name::

    from lavender_flight.transforms import Filter

    class UidModFilter(Filter, name="uid_mod"):
        def filter(self, sample: dict, *, mod: int = 2) -> bool:
            return sample["uid"] % self.mod == 0

and put the file in the server's modules folder (``--modules-dir``).
"""

from __future__ import annotations

from .base import Collater, Filter, Parameter, Plugin, Preprocessor
from .pipeline import Outcome, Pipeline, PluginFailed, Step
from .registry import ENTRY_POINT_GROUPS, PluginInfo, Plugins, Registry

__all__ = [
    "ENTRY_POINT_GROUPS",
    "Collater",
    "Filter",
    "Outcome",
    "Parameter",
    "Pipeline",
    "Plugin",
    "PluginFailed",
    "PluginInfo",
    "Plugins",
    "Preprocessor",
    "Registry",
    "Step",
]
