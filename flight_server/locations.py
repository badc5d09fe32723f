"""Where shardsets live: location URLs checked against the storage policy, resolved once, kept.

Every path from a request to storage goes through ``Locations.locate``: creating, syncing
and inferring, reads and writes. The policy is checked on every call, not only when a
shardset is created, so a shardset recorded before its location was refused (by an older
server, or before the operator narrowed the policy) is refused on read and write too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..protocol import Dataset, Shardset
from .policy import StoragePolicy
from .storage import (
    DEFAULT_RETRY,
    S3_PROTOCOLS,
    Location,
    RetryPolicy,
    merge_options,
    options_key,
    protocol_of,
    resolve_location,
)

__all__ = ["Locations", "Resolver"]

Resolver = Callable[[str, Mapping[str, Any], RetryPolicy], Location]
"""Turns a location URL and its (merged) storage options into a ``Location``."""


class Locations:
    """Resolves location URLs under a storage policy, keeping each filesystem for reuse.

    Args:
        policy: what may be opened (protocols, roots, options).
        resolve: builds a ``Location`` from a URL and its merged options.
        defaults: default storage options per protocol (``{"s3": {...}}``), laid under each
            shardset's own options (see ``ServerSettings.storage_defaults``).
        retry: how storage calls are retried on transient errors.
    """

    def __init__(
        self,
        policy: StoragePolicy | None = None,
        resolve: Resolver = resolve_location,
        defaults: Mapping[str, Mapping[str, Any]] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self.policy = policy or StoragePolicy()
        self.resolve = resolve
        self.defaults = {k: dict(v) for k, v in (defaults or {}).items()}
        self.retry = retry
        self._kept: dict[tuple[str, str], Location] = {}
        self._lock = threading.Lock()

    def options_for(self, url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options a location is opened with: the server's defaults, then ``options``."""
        protocol = protocol_of(url)
        if protocol in S3_PROTOCOLS:
            protocol = "s3"
        return merge_options(self.defaults.get(protocol, {}), options or {})

    def locate(
        self, url: str, options: Mapping[str, Any] | None = None, write: bool = False
    ) -> Location:
        """The resolved location of a URL opened with ``options`` over the server's defaults.

        The policy is checked first, every time. Remote locations are kept by URL and
        options, so a filesystem (an s3fs client with its connection pool) is built once and
        reused by every read, not per shard.

        Args:
            url: the location URL.
            options: the shardset's own storage options.
            write: the location is about to be written (read-only protocols refuse).

        Raises:
            InvalidLocation: the policy refuses it, or it cannot be resolved.
        """
        self.policy.check(url, options, write=write)
        merged = self.options_for(url, options)
        if protocol_of(url) == "file":  # cheap to resolve, and relative paths follow the cwd
            return self.resolve(url, merged, self.retry)
        key = (url.strip(), options_key(merged))
        with self._lock:
            found = self._kept.get(key)
        if found is not None:
            return found
        location = self.resolve(url, merged, self.retry)
        with self._lock:
            found = self._kept.setdefault(key, location)
            self._kept.setdefault((location.url, key[1]), found)
        return found

    def of(self, shardset: Shardset, write: bool = False) -> Location:
        """The location of a recorded shardset, opened with its own options."""
        return self.locate(shardset.location, shardset.storage_options, write=write)

    def resolver(self, dataset: Dataset) -> Callable[[str], Location]:
        """Resolves the locations of a dataset's shardsets, each with its own options."""
        options = {s.location: s.storage_options for s in dataset.shardsets}
        return lambda url: self.locate(url, options.get(url))
