"""Uid indexes: where each uid of a shardset lives, so a join looks uids up instead of scanning.

A shardset's index is its uids' 64-bit keys, sorted, each with the shard and row holding it.
Integer uids are their own keys; string uids are hashed, and every match is checked against
the uid actually read, so a hash collision never joins the wrong row.

Indexes are built from what sync reads anyway: each shard of a shardset that adds columns,
scanned or written, leaves a *run* of its keys in a file; the shardset's index merges the
runs at sync, or on first use (after a shard was written through the server, or when the
main shardset handed its role to another and became one that adds columns). Files live in
one folder beside the catalog, named by a digest of the shards they describe: a shard
rewritten or a shardset synced gives new names, so a stale index is never read. Indexes are
memory-mapped: a lookup touches a few pages of the file, not all of it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..protocol import Shard, UidValue
from ..protocol.errors import SchemaMismatch
from ..protocol.redaction import redact_urls

__all__ = ["Matches", "UidIndex", "UidIndexes", "uid_keys"]

log = logging.getLogger(__name__)

_MULTIPLIER = np.uint64(0x100000001B3)  # the FNV-1 prime; odd, so products wrap losslessly
_HASH_CHUNK = 1 << 18  # strings hashed at a time (bounds the temporary arrays)
_INDEX_SCHEMA = pa.schema([("key", pa.int64()), ("shard", pa.int32()), ("row", pa.int32())])
_RUN_SCHEMA = pa.schema([("key", pa.int64())])


def _is_integer(type_: pa.DataType) -> bool:
    return bool(pa.types.is_integer(type_))


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads the bits of a 64-bit value over the whole word."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _hash_strings(array: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string of ``array``, vectorized (a polynomial over its bytes)."""
    array = pc.cast(array, pa.large_binary()) if not pa.types.is_large_binary(array.type) else array
    if array.offset:
        array = pa.concat_arrays([array])  # a copy starting at offset 0
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[: len(array) + 1]
    data = (
        np.frombuffer(buffers[2], dtype=np.uint8)
        if buffers[2] is not None
        else np.zeros(0, np.uint8)
    )
    out = np.empty(len(array), dtype=np.uint64)
    for start in range(0, len(array), _HASH_CHUNK):
        stop = min(start + _HASH_CHUNK, len(array))
        bounds = offsets[start : stop + 1]
        chunk = data[bounds[0] : bounds[-1]].astype(np.uint64)
        starts = bounds[:-1] - bounds[0]
        lengths = np.diff(bounds)
        sums = np.zeros(stop - start, dtype=np.uint64)
        if len(chunk):
            longest = int(lengths.max())
            powers = np.cumprod(np.full(longest, _MULTIPLIER, dtype=np.uint64))
            position = np.arange(len(chunk)) - np.repeat(starts, lengths)
            terms = chunk * powers[position]
            filled = lengths > 0
            sums[filled] = np.add.reduceat(terms, starts[filled])
        out[start:stop] = _mix(sums ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
    return out.view(np.int64)


def uid_keys(uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The 64-bit keys of uids: integers as they are (exact), strings hashed."""
    chunks = uids.chunks if isinstance(uids, pa.ChunkedArray) else [uids]
    if not chunks:
        return np.zeros(0, dtype=np.int64)
    if _is_integer(uids.type):
        parts = [np.asarray(c.to_numpy(zero_copy_only=False)).astype(np.int64) for c in chunks]
    else:
        parts = [_hash_strings(c) for c in chunks]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass(frozen=True)
class Matches:
    """Where looked-up uids may live: for each candidate, the asking row, shard and row.

    Candidates are grouped by shard (ascending). Hashed keys can yield a candidate that is
    another uid: callers compare the uids they read.
    """

    asked: np.ndarray
    shards: np.ndarray
    rows: np.ndarray

    def by_shard(self) -> list[tuple[int, slice]]:
        """Each shard with the slice of candidates that live in it."""
        if not len(self.shards):
            return []
        cuts = np.flatnonzero(np.diff(self.shards)) + 1
        starts = np.concatenate([[0], cuts])
        stops = np.concatenate([cuts, [len(self.shards)]])
        return [
            (int(self.shards[a]), slice(int(a), int(b))) for a, b in zip(starts, stops, strict=True)
        ]


UidKeys = Callable[[pa.Array | pa.ChunkedArray], np.ndarray]
"""Turns uids into their 64-bit keys (``uid_keys``, or what a ``UidIndexes`` uses)."""


@dataclass(frozen=True)
class UidIndex:
    """A shardset's uid keys, sorted, with the shard index and row of each."""

    keys: np.ndarray
    shards: np.ndarray
    rows: np.ndarray
    exact: bool  # integer uids: equal keys are equal uids
    keys_of: UidKeys = field(default=uid_keys, compare=False, repr=False)

    @cached_property
    def repeats(self) -> bool:
        """Whether some key is held twice (a hash collision, or a uid held twice)."""
        return bool(len(self.duplicates()))

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, uids: pa.Array | pa.ChunkedArray) -> Matches:
        """The candidates of each uid (none for a uid the shardset lacks)."""
        keys = self.keys_of(uids)
        low = np.searchsorted(self.keys, keys, side="left")
        if self.repeats:
            high = np.searchsorted(self.keys, keys, side="right")
            counts = high - low
            total = int(counts.sum())
            asked = np.repeat(np.arange(len(keys), dtype=np.int64), counts)
            # the index positions low[i] .. high[i] of every asking row i, end to end
            first = np.repeat(low - (np.cumsum(counts) - counts), counts)
            where = first + np.arange(total, dtype=np.int64)
        else:  # one candidate at most: where the key would be, if it is there
            inside = low < len(self.keys)
            hit = np.zeros(len(keys), dtype=bool)
            hit[inside] = self.keys[low[inside]] == keys[inside]
            asked = np.flatnonzero(hit)
            where = low[asked]
        shards = self.shards[where]
        # a stable radix sort when shard indices fit 16 bits (the usual case)
        small = bool(len(shards)) and int(shards.max()) < (1 << 15)
        order = np.argsort(shards.astype(np.int16) if small else shards, kind="stable")
        return Matches(asked[order], shards[order], self.rows[where][order])

    def duplicates(self) -> np.ndarray:
        """Positions ``i`` in the index where ``keys[i] == keys[i + 1]``."""
        return np.flatnonzero(self.keys[1:] == self.keys[:-1])


def _digest(*parts: object) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def shard_digest(shard: Shard) -> str:
    """Names what a run describes: a rewritten shard (new time, size or rows) gets a new one."""
    return _digest(shard.index, shard.location, shard.size_bytes, shard.num_rows, shard.created_at)


def _write_ipc(path: Path, table: pa.Table) -> None:
    """Write an Arrow IPC file whole: under a temporary name, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(partial, path)


def _read_ipc(path: Path) -> pa.Table:
    """An Arrow IPC file, memory-mapped: its columns are views of the file's pages."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    if column.num_chunks == 1:
        return column.chunk(0).to_numpy()  # zero copy
    return column.to_numpy()


UidReader = Callable[[Shard], pa.ChunkedArray]
"""Reads the uid column of one shard (how an index is built when no run is saved)."""


class UidIndexes:
    """The uid indexes of every shardset, saved under one folder (or in memory without one).

    Args:
        root: the folder; None keeps runs and indexes in memory only.
        capacity: indexes kept open at once.
    """

    def __init__(self, root: Path | None, capacity: int = 64) -> None:
        self.root = root
        self._capacity = capacity
        self._open: OrderedDict[tuple[str, str], UidIndex] = OrderedDict()
        self._runs: dict[tuple[str, str], np.ndarray] = {}  # in memory, without a root
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        if root is not None:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("uid indexes stay in memory: cannot create %s: %s", root, exc)
                self.root = None

    def _folder(self, shardset_id: str) -> Path:
        assert self.root is not None
        return self.root / shardset_id

    def keys(self, uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The 64-bit keys of uids, as this index set stores and looks them up (``uid_keys``)."""
        return uid_keys(uids)

    # -- runs ----------------------------------------------------------------------------

    def save_run(self, shardset_id: str, shard: Shard, uids: pa.Array | pa.ChunkedArray) -> None:
        """Keep the keys of one shard's uids (in row order) for the shardset's next index."""
        keys = self.keys(uids)
        digest = shard_digest(shard)
        if self.root is None:
            with self._lock:
                self._runs[(shardset_id, digest)] = keys
            return
        path = self._folder(shardset_id) / f"run-{shard.index}-{digest}.arrow"
        try:
            _write_ipc(path, pa.table({"key": keys}, schema=_RUN_SCHEMA))
        except OSError as exc:  # the index is built from the data when it is needed
            log.warning("cannot save the uid run of %s: %s", redact_urls(shard.location), exc)

    def _run(self, shardset_id: str, shard: Shard, read_uids: UidReader) -> np.ndarray:
        digest = shard_digest(shard)
        if self.root is None:
            with self._lock:
                found = self._runs.get((shardset_id, digest))
        else:
            path = self._folder(shardset_id) / f"run-{shard.index}-{digest}.arrow"
            try:
                found = _numpy(_read_ipc(path), "key")
            except (FileNotFoundError, pa.ArrowInvalid):  # none, or another server's half
                found = None
        if found is not None and len(found) == shard.num_rows:
            return found
        uids = read_uids(shard)
        self.save_run(shardset_id, shard, uids)
        return self.keys(uids)

    # -- indexes -------------------------------------------------------------------------

    def get(
        self,
        shardset_id: str,
        shards: Sequence[Shard],
        exact: bool,
        read_uids: UidReader,
        unique: bool = False,
    ) -> UidIndex:
        """The index of a shardset made of ``shards``: opened, or built from the runs.

        Args:
            shardset_id: whose index.
            shards: the shardset's shards now (the index is named by a digest of them).
            exact: the uids are integers (keys are the uids themselves).
            read_uids: reads a shard's uids when its run is missing.
            unique: refuse a uid held twice (a shardset that adds columns must hold each
                uid once).

        Raises:
            SchemaMismatch: ``unique`` and a uid appears twice.
        """
        digest = _digest(*sorted(shard_digest(s) for s in shards))
        key = (shardset_id, digest)
        with self._lock:
            found = self._open.get(key)
            if found is not None:
                self._open.move_to_end(key)
                return found
            building = self._building.setdefault(shardset_id, threading.Lock())
        with building:  # one build per shardset at a time; the others wait and reuse it
            with self._lock:
                found = self._open.get(key)
            if found is None:
                found = self._load(shardset_id, digest, exact)
            if found is None:
                found = self._build(shardset_id, digest, list(shards), exact, read_uids)
            if unique:
                self._check_unique(shardset_id, found, shards, read_uids)
            with self._lock:
                self._open[key] = found
                while len(self._open) > self._capacity:
                    self._open.popitem(last=False)
            return found

    def _load(self, shardset_id: str, digest: str, exact: bool) -> UidIndex | None:
        if self.root is None:
            return None
        path = self._folder(shardset_id) / f"index-{digest}.arrow"
        try:
            table = _read_ipc(path)
        except (FileNotFoundError, pa.ArrowInvalid):  # not built yet (or just replaced)
            return None
        return UidIndex(
            _numpy(table, "key"), _numpy(table, "shard"), _numpy(table, "row"), exact, self.keys
        )

    def _build(
        self,
        shardset_id: str,
        digest: str,
        shards: list[Shard],
        exact: bool,
        read_uids: UidReader,
    ) -> UidIndex:
        started = time.perf_counter()
        runs = [self._run(shardset_id, shard, read_uids) for shard in shards]
        keys = np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)
        owners = np.concatenate(
            [np.full(len(r), s.index, dtype=np.int32) for r, s in zip(runs, shards, strict=True)]
            or [np.zeros(0, dtype=np.int32)]
        )
        rows = np.concatenate(
            [np.arange(len(r), dtype=np.int32) for r in runs] or [np.zeros(0, dtype=np.int32)]
        )
        order = np.argsort(keys, kind="stable")
        index = UidIndex(keys[order], owners[order], rows[order], exact, self.keys)
        if self.root is not None:
            table = pa.table(
                {"key": index.keys, "shard": index.shards, "row": index.rows},
                schema=_INDEX_SCHEMA,
            )
            try:
                _write_ipc(self._folder(shardset_id) / f"index-{digest}.arrow", table)
                self._forget_others(shardset_id, digest, shards)
            except OSError as exc:
                log.warning("cannot save the uid index of shardset %s: %s", shardset_id, exc)
        # an empty one (a feature shardset just created) is not news
        log.log(
            logging.INFO if len(index) else logging.DEBUG,
            "built the uid index of shardset %s: %d uids in %d shards (%.2fs)",
            shardset_id,
            len(index),
            len(shards),
            time.perf_counter() - started,
        )
        return index

    def _forget_others(self, shardset_id: str, digest: str, shards: Sequence[Shard]) -> None:
        """Remove the files of earlier versions of the shardset (open maps stay valid)."""
        keep = {f"index-{digest}.arrow"} | {
            f"run-{s.index}-{shard_digest(s)}.arrow" for s in shards
        }
        for path in self._folder(shardset_id).iterdir():
            if path.name not in keep and not path.name.startswith("."):
                path.unlink(missing_ok=True)

    def _check_unique(
        self,
        shardset_id: str,
        index: UidIndex,
        shards: Sequence[Shard],
        read_uids: UidReader,
    ) -> None:
        repeated = index.duplicates()
        if not len(repeated):
            return
        by_index = {s.index: s for s in shards}
        for position in repeated[:1000]:  # hashed keys: check the uids themselves
            a, b = int(position), int(position) + 1
            first = by_index[int(index.shards[a])]
            second = by_index[int(index.shards[b])]
            uid_a: UidValue
            if index.exact:  # equal keys are equal uids
                uid_a = uid_b = int(index.keys[a])
            else:
                uid_a = read_uids(first)[int(index.rows[a])].as_py()
                uid_b = read_uids(second)[int(index.rows[b])].as_py()
            if uid_a == uid_b:
                raise SchemaMismatch(
                    f"uid {uid_a!r} appears more than once in shardset {shardset_id} "
                    f"({first.location} row {int(index.rows[a])} and {second.location} row "
                    f"{int(index.rows[b])}): a shardset that adds columns must hold each "
                    "uid once"
                )

    def drop(self, shardset_id: str) -> None:
        """Forget a shardset's runs and indexes (it was deleted)."""
        with self._lock:
            for key in [k for k in self._open if k[0] == shardset_id]:
                del self._open[key]
            for key in [k for k in self._runs if k[0] == shardset_id]:
                del self._runs[key]
        if self.root is None:
            return
        folder = self._folder(shardset_id)
        if folder.is_dir():
            for path in folder.iterdir():
                path.unlink(missing_ok=True)
            try:
                folder.rmdir()
            except OSError:
                pass
