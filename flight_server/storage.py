"""Shardset locations: fsspec URLs resolved to a filesystem the Arrow readers can use."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.core import split_protocol

from ..catalog.errors import InvalidLocation, StorageError

__all__ = ["Location", "ShardFile", "resolve_location"]


@dataclass(frozen=True)
class ShardFile:
    """A file found under a location."""

    path: str
    size: int

    @property
    def name(self) -> str:
        """The file name, without folders."""
        return posixpath.basename(self.path)


@dataclass(frozen=True)
class Location:
    """A folder in some storage, with the fsspec and Arrow views of its filesystem."""

    url: str
    protocol: str
    path: str
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    arrow_fs: pafs.FileSystem = field(repr=False, compare=False)

    def child(self, name: str) -> str:
        """The storage path of a file in this folder."""
        return posixpath.join(self.path, name)

    def url_of(self, path: str) -> str:
        """The URL of a storage path (what the catalog records for a shard)."""
        return str(self.fs.unstrip_protocol(path))

    def list_files(self) -> list[ShardFile]:
        """Files directly in the folder, sorted by name (an absent folder has none)."""
        try:
            if not self.fs.exists(self.path):
                return []
            entries = self.fs.ls(self.path, detail=True)
        except OSError as exc:
            raise StorageError(f"cannot list {self.url}: {exc}") from exc
        files = [
            ShardFile(path=self.fs._strip_protocol(entry["name"]), size=int(entry.get("size") or 0))
            for entry in entries
            if entry.get("type") == "file"
        ]
        return sorted(files, key=lambda f: f.name)

    def makedirs(self) -> None:
        """Create the folder if the storage has folders."""
        try:
            self.fs.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.url}: {exc}") from exc


def resolve_location(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    """Check a location URL and return it resolved.

    Accepts any protocol fsspec knows (``file://``, ``memory://``, ``s3://``...) and plain
    paths. A relative ``file://`` path is taken relative to the server's working directory
    and recorded absolute. A location that names an existing file is refused.
    """
    url = url.strip()
    if not url:
        raise InvalidLocation("a location is required, e.g. file:///data/my-shards")
    protocol, path = split_protocol(url)
    protocol = protocol or "file"
    if protocol == "local":
        protocol = "file"
    if protocol not in fsspec.available_protocols():
        raise InvalidLocation(
            f"unknown protocol {protocol!r} in location {url!r}: use file://, memory://, s3:// "
            "or another fsspec protocol"
        )
    try:
        fs = fsspec.filesystem(protocol, **(storage_options or {}))
    except ImportError as exc:
        raise InvalidLocation(
            f"protocol {protocol!r} of {url!r} needs a package that is not installed: {exc}"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise InvalidLocation(f"cannot open {url!r}: {exc}") from exc
    if protocol == "file":
        path = str(Path(path).expanduser().resolve())
        canonical = "file://" + path
        arrow_fs: pafs.FileSystem = pafs.LocalFileSystem()
    else:
        path = fs._strip_protocol(url).rstrip("/")
        canonical = str(fs.unstrip_protocol(path))
        arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    location = Location(url=canonical, protocol=protocol, path=path, fs=fs, arrow_fs=arrow_fs)
    try:
        is_file = fs.isfile(path)
    except OSError as exc:
        raise InvalidLocation(f"cannot reach {url!r}: {exc}") from exc
    if is_file:
        raise InvalidLocation(
            f"location {url!r} names a file; a shardset location is the folder that holds "
            "its shard files"
        )
    return location
