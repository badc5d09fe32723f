"""Pydantic records of the catalog; the same models travel as JSON over the wire."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_serializer, field_validator

from .types import format_type, parse_type

__all__ = [
    "REDACTED",
    "ColumnOptions",
    "Dataset",
    "DatasetColumn",
    "Shard",
    "Shardset",
    "SyncResult",
    "UidValue",
    "column_clashes",
    "is_secret_option",
    "redact_options",
]

UidValue = int | str | None
"""A uid as stored in the catalog: uid columns are integers or strings."""


REDACTED = "***"
"""What a secret storage option shows instead of its value, whenever a record is serialized."""

_SECRET_WORDS = (
    "secret",
    "password",
    "passwd",
    "token",
    "credential",
    "access_key",
    "accesskey",
    "private",
    "connection_string",
    "sas",
    "authorization",
    "cookie",
    "signature",
)
_USERINFO = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/@:\s]*):[^/@\s]*@", re.IGNORECASE)


def column_clashes(uid: str, names: Iterable[str], taken: Iterable[tuple[str, str]]) -> list[str]:
    """The ``names`` another shardset of a dataset already has, the uid aside.

    ``taken`` pairs each column name of the dataset's shardsets with its shardset id; each
    clash reads ``'text' (in shardset ss-...)``.
    """
    owners = dict(taken)
    return [f"{n!r} (in shardset {owners[n]})" for n in names if n != uid and n in owners]


def is_secret_option(name: str) -> bool:
    """Whether a storage option of this name holds a secret (``key``, ``secret``, ``token``...).

    Errs on the side of hiding: any name ending in ``key`` or mentioning a secret, password,
    token or credential counts.
    """
    lowered = name.lower().replace("-", "_")
    return lowered.endswith("key") or any(word in lowered for word in _SECRET_WORDS)


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of storage options fit to show: secret values become ``***``, nested too.

    Passwords inside URLs (``https://user:pw@host``) are hidden as well; the names of the
    options stay, so a user can see which ones are set.
    """
    return {
        str(name): REDACTED
        if is_secret_option(str(name)) and value not in (None, "")
        else _redact_value(value)
        for name, value in options.items()
    }


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact_options(value)
    if isinstance(value, (list, tuple)):
        return [_redact_value(item) for item in value]
    if isinstance(value, str):
        return _USERINFO.sub(rf"\g<head>:{REDACTED}@", value)
    return value


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
    """One shard file of a shardset."""

    shardset_id: str
    index: int
    location: str
    format: str
    num_rows: int
    size_bytes: int
    uid_min: UidValue = None
    uid_max: UidValue = None
    created_at: float


class Shardset(_Record):
    """A group of columns of a dataset, stored as shard files under one location.

    ``storage_options`` are the fsspec options given when it was created (merged over the
    server's defaults when the location is opened). Their secrets never leave the server:
    every serialization of the record (JSON on the wire, ``model_dump``) shows them as
    ``***``, and ``repr`` leaves the options out.
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
