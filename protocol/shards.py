"""Shard files as both sides name them: formats, file names, and how shards pair up.

Pure functions of names and catalog records; reading and writing the files is the server's
(``flight_server/shards.py``).
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from collections.abc import Sequence

from .errors import InvalidArgument
from .records import Shard, UidValue

__all__ = [
    "FORMATS",
    "Span",
    "aligned_partners",
    "by_span",
    "canonical_format",
    "format_of",
    "shard_file_name",
    "shard_index_of",
    "span_of",
]

FORMATS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet", ".pq"),
    "arrow": (".arrow", ".feather", ".ipc"),
    "csv": (".csv",),
    "jsonl": (".jsonl", ".ndjson", ".json"),
}
"""Shard formats by canonical name, each with the file extensions that say it."""

_FORMAT_ALIASES = {"feather": "arrow", "ipc": "arrow", "json": "jsonl", "ndjson": "jsonl"}
_SHARD_NAME = re.compile(r"^shard\.(\d+)\.[A-Za-z0-9]+$")

Span = tuple[int, UidValue, UidValue]
"""A shard's row count and uid range: shards of two shardsets with the same span pair up."""


def canonical_format(name: str) -> str:
    """The canonical name of a shard format (``feather`` -> ``arrow``), or a clear error."""
    fmt = _FORMAT_ALIASES.get(name.lower(), name.lower())
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown shard format {name!r}; known: {', '.join(FORMATS)}")
    return fmt


def format_of(path: str) -> str | None:
    """The shard format a file name says, or None for files that are not shards."""
    lowered = path.lower()
    for fmt, extensions in FORMATS.items():
        if lowered.endswith(extensions):
            return fmt
    return None


def shard_file_name(index: int, fmt: str) -> str:
    """The file name ``Writer`` gives shard ``index``: ``shard.00000007.parquet``."""
    return f"shard.{index:08d}{FORMATS[canonical_format(fmt)][0]}"


def shard_index_of(path: str) -> int | None:
    """The index in a ``shard.N.ext`` file name, or None for other names."""
    match = _SHARD_NAME.match(posixpath.basename(path))
    return int(match.group(1)) if match else None


def span_of(shard: Shard) -> Span:
    """A shard's row count and uid range."""
    return shard.num_rows, shard.uid_min, shard.uid_max


def by_span(shards: Sequence[Shard]) -> dict[Span, Shard]:
    """Shards by row count and uid range, leaving out empty ones and spans held twice."""
    spans = Counter(span_of(s) for s in shards)
    return {span_of(s): s for s in shards if s.num_rows and spans[span_of(s)] == 1}


def aligned_partners(shards: Sequence[Shard], main_shards: Sequence[Shard]) -> dict[int, int]:
    """Which main shard each shard of a feature shardset pairs with (by index).

    The pairing reads use: a shard pairs with the one main shard of its row count and uid
    range; when their uids then compare equal, its columns are attached as read. Shards
    with no partner join by uid.
    """
    mine = by_span(shards)
    return {
        mine[key].index: main.index for key, main in by_span(main_shards).items() if key in mine
    }
