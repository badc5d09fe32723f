"""Pydantic records of the catalog; the same models travel as JSON over the wire."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_serializer, field_validator

from .redaction import REDACTED, redact_urls
from .types import format_type, parse_type

__all__ = [
    "REDACTED",
    "SAFE_OPTIONS",
    "ColumnOptions",
    "Dataset",
    "DatasetColumn",
    "Shard",
    "Shardset",
    "SyncResult",
    "UidValue",
    "column_clashes",
    "hidden_values",
    "is_secret_option",
    "redact_options",
    "redact_urls",
]

UidValue = int | str | None
"""A uid as stored in the catalog: uid columns are integers or strings."""


SAFE_OPTIONS: Mapping[str, Any] = {
    # fsspec and s3fs
    "endpoint_url": True,
    "region": True,
    "region_name": True,
    "anon": True,
    "requester_pays": True,
    "use_ssl": True,
    "version_aware": True,
    "default_block_size": True,
    "default_cache_type": True,
    "default_fill_cache": True,
    "max_concurrency": True,
    "cache_regions": True,
    "use_listings_cache": True,
    "listings_expiry_time": True,
    "skip_instance_cache": True,
    # gcsfs
    "project": True,
    "access": True,
    "consistency": True,
    "requests_timeout": True,
    "default_location": True,
    # adlfs
    "account_name": True,
    "account_host": True,
    "location_mode": True,
    "blocksize": True,
    "timeout": True,
    "client_kwargs": {
        "endpoint_url": True,
        "region_name": True,
        "use_ssl": True,
        "api_version": True,
    },
    "config_kwargs": {
        "connect_timeout": True,
        "read_timeout": True,
        "max_pool_connections": True,
        "tcp_keepalive": True,
        "signature_version": True,
        "retries": {"max_attempts": True, "total_max_attempts": True, "mode": True},
        "s3": {"addressing_style": True, "use_accelerate_endpoint": True},
    },
}
"""The storage options whose values are shown back, nested as the options are; ``True``
marks a name whose (scalar) value is shown. Every other value is ``***``: a secret by any
name (``passphrase``, ``auth``, a nested ``pass``) stays hidden because it is not on this list."""


def column_clashes(uid: str, names: Iterable[str], taken: Iterable[tuple[str, str]]) -> list[str]:
    """The ``names`` another shardset of a dataset already has, the uid aside.

    ``taken`` pairs each column name of the dataset's shardsets with its shardset id; each
    clash reads ``'text' (in shardset ss-...)``.
    """
    owners = dict(taken)
    return [f"{n!r} (in shardset {owners[n]})" for n in names if n != uid and n in owners]


def is_secret_option(name: str) -> bool:
    """Whether a storage option's value is hidden when shown back: any name not known safe.

    Names of ``SAFE_OPTIONS`` holding nested options (``client_kwargs``...) show the safe
    ones inside and hide the others.
    """
    return name not in SAFE_OPTIONS


def redact_options(
    options: Mapping[str, Any], safe: Mapping[str, Any] = SAFE_OPTIONS
) -> dict[str, Any]:
    """A copy of storage options fit to show: only values of ``safe`` names, the rest ``***``.

    The names of the options stay, so a user can see which ones are set. A safe value is
    shown when it is a plain value (text, number, boolean, null), with any password inside
    a URL hidden; a list or a mapping where a plain value is expected is hidden whole.
    """
    shown: dict[str, Any] = {}
    for name, value in options.items():
        rule = safe.get(str(name))
        if isinstance(rule, Mapping) and isinstance(value, Mapping):
            shown[str(name)] = redact_options(value, rule)
        elif rule is True and (value is None or isinstance(value, (bool, int, float))):
            shown[str(name)] = value
        elif rule is True and isinstance(value, str):
            shown[str(name)] = redact_urls(value)
        else:
            shown[str(name)] = REDACTED
    return shown


def hidden_values(
    options: Mapping[str, Any], safe: Mapping[str, Any] = SAFE_OPTIONS
) -> frozenset[str]:
    """The text values ``redact_options`` hides (4 characters or more), nested ones included.

    What to scrub from a storage library's error message, which may quote an option.
    """
    found: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, str) and len(value) >= 4:
            found.add(value)
        elif isinstance(value, Mapping):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    for name, value in options.items():
        rule = safe.get(str(name))
        if isinstance(rule, Mapping) and isinstance(value, Mapping):
            found |= hidden_values(value, rule)
        elif rule is not True or not (value is None or isinstance(value, (str, bool, int, float))):
            collect(value)
    return frozenset(found)


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ColumnOptions(BaseModel):
    """A column declared when a shardset is created (the seed's ``DatasetColumnOptions``).

    ``type_`` takes the seed's short names (``int``, ``str``, ``float``, ``bool``, ``bytes``)
    or any Arrow type string (``int32``, ``list<float32>``, ``timestamp[us]``...).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    type_: str = Field(
        validation_alias=AliasChoices("type_", "type"),
        serialization_alias="type",
        min_length=1,
        max_length=1024,
    )
    description: str = Field(default="", max_length=4096)

    @field_validator("type_", mode="before")
    @classmethod
    def _canonical_type(cls, value: object) -> str:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError("a column type is required")
        if not isinstance(value, (str, bytes)) and not hasattr(value, "id"):
            raise ValueError(f"a column type must be a string, got {type(value).__name__}")
        return format_type(parse_type(value if not isinstance(value, bytes) else value.decode()))


class DatasetColumn(_Record):
    """A column of a shardset as the catalog records it (type in canonical Arrow form)."""

    name: str
    type_: str
    description: str = ""
    shardset_id: str


class Shard(_Record):
    """One shard file of a shardset (a password in its URL is shown as ``***``)."""

    shardset_id: str
    index: int
    location: str
    format: str
    num_rows: int
    size_bytes: int
    uid_min: UidValue = None
    uid_max: UidValue = None
    created_at: float

    @field_serializer("location")
    def _shown_location(self, location: str) -> str:
        return redact_urls(location)


class Shardset(_Record):
    """A group of columns of a dataset, stored as shard files under one location.

    ``storage_options`` are the fsspec options given when it was created (merged over the
    server's defaults when the location is opened). Their values never leave the server
    unless their names are known to be safe (``SAFE_OPTIONS``): every serialization of the
    record (JSON on the wire, ``model_dump``) shows the others as ``***``, as it does a
    password inside the location URL, and ``repr`` leaves the options out.
    """

    id: str
    dataset_id: str
    location: str
    is_main: bool
    columns: list[DatasetColumn]
    shard_count: int = 0
    total_samples: int = 0
    total_bytes: int = 0
    created_at: float
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)

    @field_serializer("storage_options")
    def _redacted(self, options: dict[str, Any]) -> dict[str, Any]:
        return redact_options(options)

    @field_serializer("location")
    def _shown_location(self, location: str) -> str:
        return redact_urls(location)


class Dataset(_Record):
    """A named collection of samples, identified by the values of its uid column."""

    id: str
    name: str
    uid_column_name: str
    shardsets: list[Shardset] = []
    created_at: float

    @property
    def main_shardset(self) -> Shardset | None:
        """The shardset that decides which samples exist (None before the first one)."""
        for shardset in self.shardsets:
            if shardset.is_main:
                return shardset
        return None

    @property
    def total_samples(self) -> int:
        """Number of samples: the rows of the main shardset."""
        main = self.main_shardset
        return main.total_samples if main else 0


class SyncResult(_Record):
    """What a sync of a shardset found at its location."""

    shardset_id: str
    added: list[Shard]
    updated: list[Shard]
    removed: list[str]
    shard_count: int
    total_samples: int

    @field_serializer("removed")
    def _shown_locations(self, removed: list[str]) -> list[str]:
        return [redact_urls(location) for location in removed]
