"""Registries of plugins and their three sources: built-ins, entry points, a modules folder.

Loaded once when a server starts (``Plugins.load``), never at import time. A module file
that fails to import is reported with its path and skipped; the server keeps running.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

from ..protocol.errors import AlreadyExists, InvalidArgument
from .base import Categorizer, Collater, Filter, Plugin, Preprocessor
from .limits import DEFAULT_PLUGIN_TIMEOUT

__all__ = ["ENTRY_POINT_GROUPS", "PluginInfo", "Plugins", "Registry"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUPS = {
    "filter": "lavender_flight.filters",
    "collater": "lavender_flight.collaters",
    "preprocessor": "lavender_flight.preprocessors",
    "categorizer": "lavender_flight.categorizers",
}

P = TypeVar("P", bound=Plugin)


class Registry(Generic[P]):
    """The plugins of one kind by name; a name taken twice is an error naming both sources."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._plugins: dict[str, type[P]] = {}
        self._sources: dict[str, str] = {}

    def add(self, plugin: type[P], source: str) -> None:
        """Register a plugin class found in ``source``."""
        name = plugin.name
        if name in self._plugins and self._plugins[name] is not plugin:
            raise AlreadyExists(
                f"{self.kind} {name!r} is defined twice: in {self._sources[name]} and in {source}"
            )
        self._plugins[name] = plugin
        self._sources[name] = source

    def get(self, name: str) -> type[P]:
        """The plugin called ``name``, or an error listing the names there are."""
        try:
            return self._plugins[name]
        except KeyError:
            raise InvalidArgument(
                f"no {self.kind} named {name!r}; {self.kind}s: "
                f"{', '.join(sorted(self._plugins)) or 'none'}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._plugins)

    def source(self, name: str) -> str:
        """Where a plugin came from."""
        return self._sources[name]


@dataclass(frozen=True)
class PluginInfo:
    """What ``list_plugins`` shows of a plugin."""

    kind: str
    name: str
    doc: str
    vectorized: bool
    parameters: list[dict[str, Any]]
    depends_on: list[str]
    source: str


@dataclass
class Plugins:
    """Every plugin a server offers, the module files that failed to load, the time limit."""

    filters: Registry[Filter] = field(default_factory=lambda: Registry("filter"))
    collaters: Registry[Collater] = field(default_factory=lambda: Registry("collater"))
    preprocessors: Registry[Preprocessor] = field(default_factory=lambda: Registry("preprocessor"))
    categorizers: Registry[Categorizer] = field(default_factory=lambda: Registry("categorizer"))
    problems: list[str] = field(default_factory=list)
    modules_dir: str | None = None
    timeout: float | None = DEFAULT_PLUGIN_TIMEOUT
    """Seconds one plugin call on one batch may take (``--plugin-timeout``; None: no limit)."""

    def registry(self, kind: str) -> Registry[Any]:
        """The registry of one kind."""
        registries: dict[str, Registry[Any]] = {
            "filter": self.filters,
            "collater": self.collaters,
            "preprocessor": self.preprocessors,
            "categorizer": self.categorizers,
        }
        return registries[kind]

    def add(self, plugin: type[Plugin], source: str) -> None:
        """Register a plugin class under its kind."""
        for base in (Filter, Collater, Preprocessor, Categorizer):
            if issubclass(plugin, base):
                self.registry(base.kind).add(plugin, source)
                return
        raise InvalidArgument(
            f"{plugin!r} from {source} is not a Filter, Collater, Preprocessor or Categorizer"
        )

    def add_module(self, module: ModuleType, source: str) -> None:
        """Register the plugin classes a module defines."""
        for plugin in _defined_in(module):
            self.add(plugin, source)

    @classmethod
    def load(
        cls,
        modules_dir: str | Path | None = None,
        entry_points: bool = True,
        timeout: float | None = DEFAULT_PLUGIN_TIMEOUT,
    ) -> Plugins:
        """Built-ins, then entry points, then every ``*.py`` file of ``modules_dir``.

        ``timeout`` is how long one plugin call on one batch may take in this process
        (None: no limit; a worker process has none, its pool watches it instead).
        """
        from . import builtins

        plugins = cls(modules_dir=str(modules_dir) if modules_dir else None, timeout=timeout)
        plugins.add_module(builtins, "lavender_flight.transforms.builtins")
        if entry_points:
            for kind, group in ENTRY_POINT_GROUPS.items():
                for point in importlib.metadata.entry_points(group=group):
                    try:
                        plugins.add(point.load(), f"entry point {point.name} ({point.value})")
                    except Exception as exc:
                        plugins._problem(f"entry point {point.value} ({kind})", exc)
        if modules_dir is not None:
            folder = Path(modules_dir)
            if not folder.is_dir():
                raise InvalidArgument(f"modules folder {folder} does not exist")
            for path in sorted(folder.glob("*.py")):
                try:
                    module = _load_file(path)
                    plugins.add_module(module, str(path))
                except Exception as exc:
                    plugins._problem(str(path), exc)
        return plugins

    def _problem(self, where: str, exc: BaseException) -> None:
        message = f"{where}: {type(exc).__name__}: {exc}"
        self.problems.append(message)
        log.error("could not load plugins from %s", message)

    def describe(self) -> list[PluginInfo]:
        """Every plugin with its kind, doc line, parameters and source."""
        infos = []
        for kind in ("filter", "collater", "preprocessor", "categorizer"):
            registry = self.registry(kind)
            for name in registry.names():
                plugin = registry.get(name)
                infos.append(
                    PluginInfo(
                        kind=kind,
                        name=name,
                        doc=plugin.doc(),
                        vectorized=plugin.vectorized(),
                        parameters=[
                            {
                                "name": p.name,
                                "type": p.annotation,
                                "default": p.default if _jsonable(p.default) else repr(p.default),
                                "required": p.required,
                            }
                            for p in plugin.parameters()
                        ],
                        depends_on=list(plugin.depends_on),
                        source=registry.source(name),
                    )
                )
        return infos


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, dict))


def _defined_in(module: ModuleType) -> Iterable[type[Plugin]]:
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if (
            issubclass(obj, Plugin)
            and obj.__module__ == module.__name__
            and obj not in (Plugin, Filter, Collater, Preprocessor, Categorizer)
            and not obj.is_abstract()
        ):
            yield obj


def _load_file(path: Path) -> ModuleType:
    """Import a module by path under a name of its own (so same-named files never clash)."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    name = f"lavender_flight_modules.{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
