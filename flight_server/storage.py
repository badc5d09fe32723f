"""Shardset locations: fsspec URLs resolved to a filesystem, with retries on transient errors.

Local folders are read in place by Arrow. Any other storage (``s3://``, ``memory://``, any
fsspec protocol installed) is read whole into memory and written from memory: no local
cache, no temporary file, nothing on disk. Which locations may be opened at all is the
storage policy's call (``policy.StoragePolicy``, checked by ``locations.Locations``), made
before anything here runs. Every call to storage goes through one retry loop
(``RetryPolicy``): connection errors, timeouts, HTTP 5xx and throttling are tried again with
exponential backoff; a missing object, a refused request or a bad option is not.

For ``s3://`` this loop is the only one: s3fs's and botocore's own retries are turned off
(unless a shardset's options set ``config_kwargs.retries``), so the time spent on a dead
endpoint is bounded by the policy, not by three layers of retries multiplied.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import posixpath
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
from fsspec.core import split_protocol

from ..protocol.errors import InvalidLocation, LavenderError, ShardNotFound, StorageError
from ..protocol.records import hidden_values
from ..protocol.redaction import redact_urls, scrub_values

__all__ = [
    "DEFAULT_RETRY",
    "Location",
    "RetryPolicy",
    "ShardFile",
    "is_transient",
    "merge_options",
    "options_key",
    "protocol_of",
    "resolve_location",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

S3_PROTOCOLS = ("s3", "s3a")
# Read from, never written to (a web server has no PUT for us).
_READ_ONLY = frozenset({"http", "https"})
# Object stores have no folders to create (and a bucket is never created implicitly).
_OBJECT_STORES = frozenset({*S3_PROTOCOLS, "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
# Our retry loop is the one that counts: botocore and s3fs try once per call.
_S3_BASELINE: dict[str, Any] = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}

_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EAGAIN,
        getattr(errno, "EREMOTEIO", errno.EIO),
    }
)
# botocore, aiohttp and fsspec errors that mean "the network or the server hiccuped"
# (matched by class name so that no client library has to be importable)
_TRANSIENT_CLASSES = frozenset(
    {
        "HTTPClientError",  # botocore: ReadTimeoutError, ConnectionClosedError...
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "IncompleteReadError",
        "ResponseParserError",
        "ClientConnectionError",  # aiohttp: ServerDisconnectedError...
        "ClientPayloadError",
        "ServerTimeoutError",
        "FSTimeoutError",
    }
)
_THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
    }
)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class RetryPolicy:
    """How storage calls are retried on transient errors: exponential backoff, bounded.

    Attempt ``n`` (from 1) that fails transiently is followed by a pause of
    ``first_delay * 2 ** (n - 1)`` seconds (at most ``max_delay``, with +-20 % jitter), unless
    ``attempts`` are spent or the next pause would end past ``deadline`` seconds since the
    first attempt.
    """

    attempts: int = 5
    first_delay: float = 0.2
    max_delay: float = 3.0
    deadline: float = 30.0

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt ``attempt`` (counted from 1)."""
        base = min(self.max_delay, self.first_delay * 2 ** (attempt - 1))
        return base * random.uniform(0.8, 1.2)


DEFAULT_RETRY = RetryPolicy()
"""Five attempts, pauses of about 0.2, 0.4, 0.8 and 1.6 s, never past 30 s in all."""


def _chain(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in found and len(found) < 8:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def _http_status(exc: BaseException) -> tuple[int | None, str]:
    """The HTTP status and error code an exception carries (botocore, gcsfs, aiohttp...)."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        meta = response.get("ResponseMetadata") or {}
        code = (response.get("Error") or {}).get("Code") or ""
        status = meta.get("HTTPStatusCode")
        return (int(status) if isinstance(status, int) else None), str(code)
    for name in ("status", "status_code", "code"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, ""
    return None, ""


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth another try.

    Yes: connection refused/reset/closed, timeouts, HTTP 5xx, 408, 429 and throttling codes
    (``SlowDown``...). No: a missing object or bucket, a refused permission, bad options,
    any other 4xx. The exception's causes are looked at too (s3fs wraps botocore's).
    """
    for error in _chain(exc):
        if isinstance(error, _PERMANENT):
            return False
        status, code = _http_status(error)
        if code in _THROTTLING_CODES:
            return True
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if _TRANSIENT_CLASSES.intersection(cls.__name__ for cls in type(error).__mro__):
            return True
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def _describe(exc: BaseException) -> str:
    """A library error in one line, any password of a URL in it hidden."""
    text = redact_urls((str(exc).strip().splitlines() or [""])[0][:500])
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def merge_options(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``; nested mappings (``client_kwargs``...) merge key by key."""
    merged = dict(base)
    for name, value in override.items():
        old = merged.get(name)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            merged[name] = merge_options(old, value)
        else:
            merged[name] = value
    return merged


def options_key(options: Mapping[str, Any]) -> str:
    """A stable text form of storage options (for caching filesystems by their options)."""
    return json.dumps(options, sort_keys=True, default=repr)


def protocol_of(url: str) -> str:
    """The fsspec protocol of a location URL (``file`` for plain paths)."""
    protocol, _ = split_protocol(url.strip())
    protocol = protocol or "file"
    return "file" if protocol == "local" else protocol


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
    """A folder in some storage, with the fsspec and Arrow views of its filesystem.

    Its methods are the storage calls the server makes (list, fetch, store, remove); each is
    retried on transient errors under ``retry`` and fails as ``StorageError`` naming the URL.
    """

    url: str
    protocol: str
    path: str
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    arrow_fs: pafs.FileSystem = field(repr=False, compare=False)
    retry: RetryPolicy = field(default=DEFAULT_RETRY, repr=False, compare=False)
    hidden: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @property
    def is_local(self) -> bool:
        """Whether the folder is on this machine's disk (read in place, not fetched)."""
        return self.protocol == "file"

    @property
    def read_only(self) -> bool:
        """Whether the storage is only read (``http``/``https``), never written through."""
        return self.protocol in _READ_ONLY

    @property
    def shown(self) -> str:
        """The URL fit to show in a message or a log line (a password in it as ``***``)."""
        return redact_urls(self.url)

    def child(self, name: str) -> str:
        """The storage path of a file in this folder."""
        return posixpath.join(self.path, name)

    def url_of(self, path: str) -> str:
        """The URL of a storage path (what the catalog records for a shard)."""
        return str(self.fs.unstrip_protocol(path))

    def path_of(self, url: str) -> str:
        """The storage path of a URL the catalog recorded."""
        return str(self.fs._strip_protocol(url))

    def describe(self, exc: BaseException) -> str:
        """A storage error in one line, without a secret of the location's options in it."""
        return scrub_values(_describe(exc), self.hidden)

    def call(self, operation: Callable[[], T], what: str) -> T:
        """Run one storage call, retried on transient errors under the location's policy.

        ``FileNotFoundError`` passes through for the caller to name; every other failure
        becomes ``StorageError("<what>: <reason>")``, saying how long it was retried.

        Args:
            operation: the call, without arguments; it must be safe to repeat.
            what: the start of the error message, e.g. ``"cannot read s3://b/p/x.parquet"``.
        """
        start = time.monotonic()
        for attempt in itertools.count(1):
            try:
                return operation()
            except (LavenderError, FileNotFoundError):
                raise
            except Exception as exc:
                if not is_transient(exc):
                    raise StorageError(f"{what}: {self.describe(exc)}") from exc
                pause = self.retry.delay(attempt)
                elapsed = time.monotonic() - start
                if attempt >= self.retry.attempts or elapsed + pause > self.retry.deadline:
                    raise StorageError(
                        f"{what}: {self.describe(exc)} (still failing after {attempt} attempts "
                        f"over {elapsed:.1f}s)"
                    ) from exc
                log.warning(
                    "%s: %s; retrying in %.1fs (attempt %d of %d)",
                    *(
                        redact_urls(what),
                        self.describe(exc),
                        pause,
                        attempt + 1,
                        self.retry.attempts,
                    ),
                )
                time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def list_files(self) -> list[ShardFile]:
        """Files directly in the folder, sorted by name (an absent folder has none).

        Object stores are listed page by page (S3 answers 1,000 keys a page), always afresh:
        fsspec's listing cache is dropped first, so files added meanwhile are seen.
        """

        def listing() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(self.path)
            return list(self.fs.ls(self.path, detail=True))  # absent: FileNotFoundError

        try:
            entries = self.call(listing, f"cannot list {self.url}")
        except FileNotFoundError:
            return []
        files = [
            ShardFile(path=self.path_of(entry["name"]), size=int(entry.get("size") or 0))
            for entry in entries
            if entry.get("type") == "file"
        ]
        return sorted(files, key=lambda f: f.name)

    def fetch(self, path: str, size: int | None = None) -> pa.Buffer:
        """The whole content of a file, in memory.

        On S3 that is one GET, or a few ranged ones side by side for objects larger than
        s3fs's block size (50 MiB); knowing ``size`` saves the HEAD request that finds out.
        A missing file raises ``ShardNotFound`` naming its URL.
        """
        url = self.url_of(path)
        options: dict[str, Any] = {}
        if self.protocol in S3_PROTOCOLS and size is not None:
            if size <= getattr(self.fs, "default_block_size", 0):
                options["max_concurrency"] = 1  # small: one plain GET, no HEAD first
        try:
            data = self.call(lambda: self.fs.cat_file(path, **options), f"cannot read {url}")
        except FileNotFoundError as exc:
            raise ShardNotFound(
                f"shard file {url} does not exist in storage (removed or renamed since it "
                "was registered? sync the shardset to forget it)"
            ) from exc
        return pa.py_buffer(data)

    def store(self, path: str, data: pa.Buffer) -> None:
        """Write a whole file from memory (one PUT on object stores, which publish it whole)."""
        url = self.url_of(path)
        if self.read_only:
            raise InvalidLocation(
                f"location {self.url} is read-only ({self.protocol}): write shards to file:// "
                "or an object store"
            )
        if not self.is_local and self.protocol not in _OBJECT_STORES:
            self.makedirs()
        payload = data.to_pybytes()
        try:
            self.call(lambda: self.fs.pipe_file(path, payload), f"cannot write {url}")
        except FileNotFoundError as exc:
            raise StorageError(
                f"cannot write {url}: its bucket or folder does not exist ({self.describe(exc)})"
            ) from exc

    def remove(self, path: str) -> None:
        """Delete a file (a missing one is fine)."""
        try:
            self.call(lambda: self.fs.rm_file(path), f"cannot remove {self.url_of(path)}")
        except FileNotFoundError:
            pass

    def makedirs(self) -> None:
        """Create the folder if the storage has folders."""
        if self.protocol in _OBJECT_STORES:
            return
        try:
            self.call(
                lambda: self.fs.makedirs(self.path, exist_ok=True), f"cannot create {self.url}"
            )
        except FileNotFoundError as exc:
            raise StorageError(f"cannot create {self.url}: {self.describe(exc)}") from exc


def resolve_location(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> Location:
    """Check a location URL and return it resolved.

    Accepts any protocol fsspec knows (``file://``, ``memory://``, ``s3://``...) and plain
    paths: whether the server may open it is not asked here but first, by the storage
    policy (``Locations.locate``); call this directly only on locations you trust. A
    relative ``file://`` path is taken relative to the server's working directory and
    recorded absolute. A location that names an existing file is refused.

    Args:
        url: the folder URL.
        storage_options: keyword arguments of the fsspec filesystem (s3fs: ``key``,
            ``secret``, ``endpoint_url``, ``client_kwargs``, ``config_kwargs``...).
        retry: how storage calls of the location are retried.
    """
    url = url.strip()
    if not url:
        raise InvalidLocation("a location is required, e.g. file:///data/my-shards")
    protocol = protocol_of(url)
    if protocol not in fsspec.available_protocols():
        raise InvalidLocation(
            f"unknown protocol {protocol!r} in location {url!r}: use file://, s3://, gs://, "
            "az:// or another protocol fsspec knows"
        )
    options = dict(storage_options or {})
    hidden = hidden_values(options)  # never quoted back, even by a library's error
    if protocol in S3_PROTOCOLS:
        options = merge_options(_S3_BASELINE, options)
    try:
        # our own instance: the service caches it, and its retry setting is ours to change
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    except ImportError as exc:
        raise InvalidLocation(
            f"protocol {protocol!r} of {url!r} needs a package that is not installed: {exc}"
        ) from exc
    except (TypeError, ValueError, KeyError) as exc:
        reason = scrub_values(str(exc), hidden)
        raise InvalidLocation(f"cannot open {url!r} with these storage options: {reason}") from exc
    if protocol in S3_PROTOCOLS:
        fs.retries = 1
    _, path = split_protocol(url)
    if protocol == "file":
        path = str(Path(path).expanduser().resolve())
        canonical = "file://" + path
        arrow_fs: pafs.FileSystem = pafs.LocalFileSystem()
    else:
        path = fs._strip_protocol(url).rstrip("/")
        canonical = str(fs.unstrip_protocol(path))
        arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    location = Location(
        url=canonical,
        protocol=protocol,
        path=path,
        fs=fs,
        arrow_fs=arrow_fs,
        retry=retry,
        hidden=hidden,
    )
    if location.read_only:  # a web server answers for a folder as for a file: no telling
        return location
    try:  # fsspec's isfile() says False for any error; info() tells them apart
        is_file = location.call(lambda: fs.info(path)["type"] == "file", f"cannot reach {url!r}")
    except FileNotFoundError:
        is_file = False
    except StorageError as exc:
        raise InvalidLocation(str(exc)) from exc
    if is_file:
        raise InvalidLocation(
            f"location {url!r} names a file; a shardset location is the folder that holds "
            "its shard files"
        )
    return location
