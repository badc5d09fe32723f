"""Which storage locations the server may open: an allowlist of protocols, folders and options.

fsspec reaches much more than object stores: its wrapper protocols (``reference``, ``zip``,
``tar``, ``dir``, the caching ones, ``libarchive``...) open another filesystem named by a
storage option (``fo``, ``path``, ``target_protocol``, ``fs``...) or by a chained URL
(``simplecache::file:///etc``), and so read any local file whatever the storage roots say.
The server therefore accepts what it can confine and refuses the rest:

- ``file://`` (and plain paths) under the storage roots, ``..`` and symlinks resolved first;
- the remote object stores ``s3``/``s3a``, ``gs``/``gcs``, ``az``/``abfs``/``abfss``;
- ``memory://`` only when turned on (``--allow-memory``: for tests and demos);
- any other protocol only when the operator names it (``--allow-protocol NAME``), at their
  own risk; ``http``/``https`` are then read-only.

Whatever the protocol, a chained URL (``a::b``) is refused, and so is a storage option that
names another filesystem or protocol (``DENIED_OPTIONS``), or whose value is a URL of
another protocol or the path of something on the server's disk.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import split_protocol

from ..protocol.errors import InvalidArgument, InvalidLocation
from .storage import protocol_of

__all__ = [
    "DENIED_OPTIONS",
    "OBJECT_STORES",
    "READ_ONLY_PROTOCOLS",
    "StoragePolicy",
    "check_printable",
]

OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
"""Remote object stores, allowed by default: they reach only their own buckets."""

READ_ONLY_PROTOCOLS = frozenset({"http", "https"})
"""Protocols the server reads but never writes through (when they are allowed at all)."""

DENIED_OPTIONS = frozenset(
    {
        # another filesystem, or the file it reads (reference, zip, tar, libarchive, git...)
        "fo",
        "fs",
        "target",
        "filesystem",
        "index_store",
        "ref_storage_args",
        "template_overrides",
        "simple_templates",
        # another protocol and its options (the caching wrappers, reference, dir...)
        "protocol",
        "target_protocol",
        "target_options",
        "remote_protocol",
        "remote_options",
        "storage_options",
        # a folder of the server's disk (dir, the caching wrappers)
        "path",
        "root",
        "root_path",
        "base_path",
        "cache_storage",
        "cache_mapper",
        "cache_check",
        "check_files",
        "same_names",
        "expiry_time",
        # live objects (never JSON, but refused by name all the same)
        "session",
        "loop",
        "asynchronous",
    }
)
"""Storage option names refused at any depth: they name a local path or another filesystem."""

_WEB_SCHEMES = ("http://", "https://")
_CHANGE_HINT = (
    "start the server with --allow-protocol NAME to allow another one (dangerous: "
    "wrapper protocols such as reference, zip, tar, dir and the caching ones read any "
    "file of the server)"
)


def check_printable(what: str, value: str) -> None:
    """Refuse a name holding a control character (NUL, newline, tab, escape...).

    Such names forge log lines and break every display of them.

    Raises:
        InvalidArgument: naming the character and where it is.
    """
    for position, char in enumerate(value):
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            raise InvalidArgument(
                f"{what} {value!r} holds a control character (U+{ord(char):04X} at position "
                f"{position}): use printable characters only"
            )


def _walk(options: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """Every ``(dotted name, name, value)`` of nested options, lists included."""
    for name, value in options.items():
        dotted = f"{prefix}{name}"
        yield dotted, str(name), value
        if isinstance(value, Mapping):
            yield from _walk(value, dotted + ".")
        elif isinstance(value, (list, tuple)):
            for number, item in enumerate(value):
                if isinstance(item, Mapping):
                    yield from _walk(item, f"{dotted}[{number}].")
                else:
                    yield f"{dotted}[{number}]", str(name), item


def _names_local_path(value: str) -> bool:
    """Whether an option value is the path of something on this machine's disk."""
    if "\x00" in value or len(value) > 4096:
        return False
    if not (value.startswith(("/", "~", ".")) or "/" in value or "\\" in value):
        return False  # a plain word (a region, a bucket): not a path
    try:
        return os.path.lexists(os.path.expanduser(value))
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class StoragePolicy:
    """The locations a server may open, checked before any filesystem is built.

    Args:
        roots: folders ``file://`` locations must be under (None: anywhere on the disk).
        extra_protocols: protocols allowed beyond ``file`` and the object stores
            (``--allow-protocol``).
        allow_memory: accept ``memory://`` (the server's own RAM; tests and demos).
    """

    roots: tuple[Path, ...] | None = None
    extra_protocols: frozenset[str] = field(default_factory=frozenset)
    allow_memory: bool = False

    @classmethod
    def build(
        cls,
        roots: Sequence[str | Path] | None = None,
        allow_protocols: Iterable[str] = (),
        allow_memory: bool = False,
    ) -> StoragePolicy:
        """A policy from settings: roots resolved, protocol names stripped and lowered."""
        return cls(
            roots=None if roots is None else tuple(Path(r).expanduser().resolve() for r in roots),
            extra_protocols=frozenset(p.strip().lower() for p in allow_protocols if p.strip()),
            allow_memory=allow_memory,
        )

    @property
    def protocols(self) -> tuple[str, ...]:
        """Every allowed protocol: ``file`` first, then the others by name."""
        others = set(OBJECT_STORES) | self.extra_protocols
        if self.allow_memory:
            others.add("memory")
        others.discard("file")
        return ("file", *sorted(others))

    def allows(self, protocol: str) -> bool:
        """Whether locations of ``protocol`` may be opened at all."""
        return protocol in ("file", "local") or protocol in self.protocols

    def check(
        self, url: str, options: Mapping[str, Any] | None = None, write: bool = False
    ) -> None:
        """Refuse a location the server must not open (nothing is touched to decide).

        Args:
            url: the location as given or recorded.
            options: the shardset's own storage options (the server's defaults are the
                operator's, and trusted).
            write: the location is about to be written.

        Raises:
            InvalidLocation: one line saying what is refused and what is allowed.
        """
        url = url.strip()
        check_printable("location", url)
        if "::" in url:
            raise InvalidLocation(
                f"location {url!r} chains protocols ('::'): the server opens one protocol at "
                f"a time; allowed: {self._allowed()}"
            )
        protocol = protocol_of(url)
        if not self.allows(protocol):
            if protocol not in fsspec.available_protocols():
                raise InvalidLocation(
                    f"unknown protocol {protocol!r} in location {url!r}: this server opens "
                    f"{self._allowed()}"
                )
            hint = (
                "start the server with --allow-memory to allow it (tests and demos)"
                if protocol == "memory"
                else _CHANGE_HINT
            )
            raise InvalidLocation(
                f"protocol {protocol!r} of location {url!r} is not allowed: this server opens "
                f"{self._allowed()}; {hint}"
            )
        self.check_options(options or {})
        if protocol == "file":
            self.check_root(url)
        if write and protocol in READ_ONLY_PROTOCOLS:
            raise InvalidLocation(
                f"location {url!r} is read-only ({protocol} is never written through): write "
                "shards to file:// or an object store"
            )

    def _allowed(self) -> str:
        names = ["file:// under the storage roots", *self.protocols[1:]]
        return ", ".join(names)

    @staticmethod
    def check_options(options: Mapping[str, Any]) -> None:
        """Refuse storage options that name a local path or another filesystem or protocol.

        Raises:
            InvalidLocation: naming the option (dotted when nested), never its value.
        """
        for dotted, name, value in _walk(options):
            if name.lower().replace("-", "_") in DENIED_OPTIONS:
                raise InvalidLocation(
                    f"storage option {dotted!r} is refused: it names another filesystem, "
                    "protocol or a local path, which the server never opens for a client"
                )
            if not isinstance(value, str):
                continue
            text = value.strip()
            scheme, _ = split_protocol(text)
            chained = "::" in text and "://" in text  # (an ARN's "::" is no chain)
            if chained or (scheme and not text.lower().startswith(_WEB_SCHEMES)):
                raise InvalidLocation(
                    f"storage option {dotted!r} is refused: its value names another protocol "
                    "(only http:// and https:// URLs are accepted in options)"
                )
            if _names_local_path(text):
                raise InvalidLocation(
                    f"storage option {dotted!r} is refused: its value is a path on the "
                    "server's disk, which the server never opens for a client"
                )

    def check_root(self, url: str) -> None:
        """Refuse a ``file://`` location outside the storage roots.

        ``..`` and symlinks are followed first, so neither escapes a root.

        Raises:
            InvalidLocation: the folder is outside every root.
        """
        if self.roots is None:
            return
        _, path = split_protocol(url.strip())
        try:
            real = Path(path).expanduser().resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise InvalidLocation(f"cannot resolve location {url!r}: {exc}") from exc
        if any(real == root or real.is_relative_to(root) for root in self.roots):
            return
        roots = ", ".join(str(r) for r in self.roots)
        raise InvalidLocation(
            f"location {url.strip()!r} is outside the server's storage roots ({roots}); "
            "start the server with --storage-root to allow it"
        )
