"""Reading a dataset: its main shardset shard by shard, other shardsets joined by uid.

A shardset that adds columns joins one of two ways, chosen per main shard:

- **aligned**: a feature shard with the main shard's row count and uid range (recorded at
  sync) is read and its uid column compared with the main one; when they are equal its
  columns are attached as they are, without a copy;
- **by uid**: otherwise the shardset's uid index (built at sync, see ``uid_index``) says
  which feature shards and rows hold the main shard's uids; only those shards are read
  (kept in a cache shared by every read, bounded in bytes) and their rows taken.

Under a left join a uid the feature shardset lacks gets nulls; under an inner join the
reader also says which rows lack a feature row, for the caller to leave out.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..catalog import Catalog
from ..protocol import Dataset, Shard, Shardset
from ..protocol.errors import InvalidArgument, ShardNotFound, ShardsetNotFound
from ..protocol.shards import Span, by_span, span_of
from .locations import Locations
from .memory import MemoryBudget
from .read_pool import ReadPool, store_key
from .shard_io import ShardIO
from .shards import declared_schema
from .storage import Location
from .uid_index import UidIndex, UidIndexes, shard_digest

__all__ = ["DatasetReader", "Join", "ShardCache", "ShardsetView"]

log = logging.getLogger(__name__)

Join = Literal["left", "inner"]
"""How feature shardsets join the main one: ``left`` keeps every main sample (missing
values are null), ``inner`` keeps the samples present in every selected shardset."""

DEFAULT_CACHE_BYTES = 512 << 20


class ShardCache:
    """The decoded shard files of a server, kept in its memory budget (an LRU in bytes).

    Every read of a shard file goes through it: the main shards an iteration streams, the
    aligned feature shards attached to them, and the feature shards a join by uid takes
    rows from (a main shard joining a shuffled feature shardset needs rows of many feature
    shards, and so does the next one). A dataset that fits the budget is decoded once:
    its next epochs, and other iterations over it, read no file.

    Each key has one entry from the moment a read of it starts: readers arriving while it
    is read wait for that read, and the finished table stays under the same entry, so no
    reader ever finds the key absent between the read and its keeping (and reads it again).

    Args:
        max_bytes: the size of a private budget (when ``budget`` is not given).
        budget: the server's memory budget, shared with what streams hold.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, budget: MemoryBudget | None = None):
        self.budget = budget if budget is not None else MemoryBudget(max_bytes)

    @property
    def max_bytes(self) -> int:
        """The budget the cache lives in."""
        return self.budget.max_bytes

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self.budget.kept_bytes

    def weigh(self, table: pa.Table) -> int:
        """The bytes a table counts for in the budget."""
        return int(table.nbytes)

    def get(self, key: Hashable, read: Callable[[], pa.Table]) -> pa.Table:
        """The table cached under ``key``, else ``read()`` (kept when it fits).

        Readers asking for a table being read wait for that read instead of repeating it.
        A failed read is not kept: the next reader tries again.
        """
        return self.budget.get(key, read, self.weigh)

    def peek(self, key: Hashable) -> pa.Table | None:
        """The table cached under ``key`` if it is decoded already; None otherwise (no read)."""
        found = self.budget.peek(key)
        return found if found is None else cast(pa.Table, found)


@dataclass
class ShardsetView:
    """One shardset as a read needs it: where it is, what it declares, which columns to read."""

    shardset: Shardset
    location: Location
    schema: pa.Schema
    columns: list[str]
    shards: list[Shard]
    by_index: dict[int, Shard] = field(init=False)
    by_span: dict[Span, Shard] = field(init=False)

    def __post_init__(self) -> None:
        self.by_index = {shard.index: shard for shard in self.shards}
        self.by_span = by_span(self.shards)
        self.lane = store_key(self.location)

    def aligned_with(self, main_shard: Shard) -> Shard | None:
        """The one shard with the main shard's row count and uid range, if any."""
        return self.by_span.get(span_of(main_shard)) if main_shard.num_rows else None


class DatasetReader:
    """Reads the joined rows of a dataset, one main shard at a time.

    The main shardset decides which samples exist and their order; every other selected
    shardset adds its columns by uid. Only the shardsets and columns asked for are opened:
    a shardset none of whose columns is wanted is never read.

    Args:
        catalog: where the shards are listed.
        dataset: the dataset read.
        shardset_ids: the shardsets to read (default: all; the main one always).
        columns: the columns to read (default: all).
        resolve: the location of a shardset URL (default: under the default storage
            policy, without storage options).
        join: ``left`` (missing values are null) or ``inner`` (see ``read_joined``).
        indexes: the server's uid indexes (in memory only when not given).
        cache: the server's cache of decoded shard files (a private one when not given).
        shard_io: every read of a shard file (the server's, shared with registration).
        pool: the server's read pool: each file is read on its store's lane (default: on
            the calling thread).
    """

    def __init__(
        self,
        catalog: Catalog,
        dataset: Dataset,
        shardset_ids: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        resolve: Callable[[str], Location] | None = None,
        join: Join = "left",
        indexes: UidIndexes | None = None,
        cache: ShardCache | None = None,
        shard_io: ShardIO | None = None,
        pool: ReadPool | None = None,
    ) -> None:
        if join not in ("left", "inner"):
            raise InvalidArgument(f"join must be 'left' or 'inner', not {join!r}")
        self.dataset = dataset
        self.join = join
        self.indexes = indexes or UidIndexes(None)
        self.cache = cache or ShardCache()
        self.shard_io = shard_io or ShardIO()
        self.pool = pool
        resolve = resolve or Locations().locate
        self.reads: Counter[str] = Counter()  # shard files read from storage, by shardset id
        uid = dataset.uid_column_name
        main = dataset.main_shardset
        if main is None:
            raise InvalidArgument(
                f"dataset {dataset.name!r} has no shardset yet, so no rows to read: add one "
                "with create_shardset"
            )
        by_id = {s.id: s for s in dataset.shardsets}
        chosen = list(dataset.shardsets) if shardset_ids is None else []
        for shardset_id in shardset_ids or ():
            if shardset_id not in by_id:
                raise ShardsetNotFound(
                    f"no shardset {shardset_id!r} in dataset {dataset.name!r}; "
                    f"it has {', '.join(by_id) or 'none'}"
                )
            if by_id[shardset_id] not in chosen:
                chosen.append(by_id[shardset_id])
        if main not in chosen:
            chosen.insert(0, main)
        chosen.sort(key=lambda s: (not s.is_main, dataset.shardsets.index(s)))
        available = [c.name for s in chosen for c in s.columns if c.name != uid]
        if columns is not None:
            unknown = [c for c in columns if c != uid and c not in available]
            if unknown:
                raise InvalidArgument(
                    f"unknown column(s) {', '.join(map(repr, unknown))} in dataset "
                    f"{dataset.name!r}; columns: {', '.join([uid, *available])}"
                )
        wanted = set(available if columns is None else columns)
        self.views: list[ShardsetView] = []
        for shardset in chosen:
            names = [c.name for c in shardset.columns if c.name != uid and c.name in wanted]
            if not shardset.is_main and not names:
                continue  # projection: a shardset with nothing to give is never opened
            self.views.append(
                ShardsetView(
                    shardset=shardset,
                    location=resolve(shardset.location),
                    schema=declared_schema([(c.name, c.type_) for c in shardset.columns]),
                    columns=[uid, *names],
                    shards=catalog.list_shards(shardset.id),
                )
            )
        self.main = self.views[0]
        fields = [self.main.schema.field(uid)]
        for view in self.views:
            fields.extend(view.schema.field(name) for name in view.columns[1:])
        self.schema = pa.schema(fields)
        self._lock = threading.Lock()  # streams and prefetch threads share one reader

    @property
    def main_shards(self) -> list[Shard]:
        """The shards of the main shardset, in order."""
        return self.main.shards

    @property
    def total_rows(self) -> int:
        """Rows of the main shardset (an inner join may deliver fewer)."""
        return sum(shard.num_rows for shard in self.main.shards)

    def main_shard(self, index: int) -> Shard:
        """The main shard with catalog index ``index``."""
        shard = self.main.by_index.get(index)
        if shard is None:
            raise ShardNotFound(f"no shard {index} in shardset {self.main.shardset.id}")
        return shard

    # -- storage -------------------------------------------------------------------------

    def _read(self, view: ShardsetView, shard: Shard, columns: list[str] | None = None) -> pa.Table:
        """Read one shard of a view from storage (its ``columns``, by default the view's).

        On the read pool's lane of the view's store when there is a pool: a slow store
        holds only its own lane.
        """
        with self._lock:
            self.reads[view.shardset.id] += 1

        def read() -> pa.Table:
            return self.shard_io.read(
                view.location,
                view.location.path_of(shard.location),
                shard.format,
                view.schema,
                columns or view.columns,
                size=shard.size_bytes,  # known from the catalog: no size request to the store
            )

        if self.pool is None:
            return read()
        return self.pool.run(view.lane, read, f"reading {view.location.shown}")

    @staticmethod
    def _key(view: ShardsetView, shard: Shard) -> Hashable:
        return (view.shardset.id, shard.index, shard_digest(shard), tuple(view.columns))

    def _cached(self, view: ShardsetView, shard: Shard) -> pa.Table:
        """A shard of a view, decoded once for the whole server (see ``ShardCache``)."""
        return self.cache.get(self._key(view, shard), lambda: self._read(view, shard))

    def cached(self, shard: Shard) -> bool:
        """Whether a main shard's file is decoded already (in the server's cache)."""
        return self._key(self.main, shard) in self.cache.budget

    def _index(self, view: ShardsetView) -> UidIndex:
        uid = self.dataset.uid_column_name
        return self.indexes.get(
            view.shardset.id,
            view.shards,
            exact=pa.types.is_integer(view.schema.field(uid).type),
            read_uids=lambda shard: self._read(view, shard, [uid]).column(uid),
            unique=True,
        )

    def decoded_bytes(self, shard: Shard) -> int:
        """About how many bytes the joined rows of a main shard take in memory."""
        main = self.main
        total = self.shard_io.decoded_size(
            main.location, main.location.path_of(shard.location), shard.format,
            main.columns, shard.size_bytes,
        )  # fmt: skip
        for view in self.views[1:]:
            partner = view.aligned_with(shard)
            if partner is not None:
                total += self.shard_io.decoded_size(
                    view.location, view.location.path_of(partner.location), partner.format,
                    view.columns, partner.size_bytes,
                )  # fmt: skip
                continue
            rows = sum(s.num_rows for s in view.shards)
            size = sum(s.size_bytes for s in view.shards)
            total += int(size / rows * shard.num_rows) if rows else 0
        return total

    # -- joins ---------------------------------------------------------------------------

    def read(self, shard: Shard) -> pa.Table:
        """The joined rows of one main shard (an inner join leaves out the incomplete ones)."""
        table, missing = self.read_joined(shard)
        return table if missing is None else table.filter(pa.array(~missing))

    def read_joined(self, shard: Shard) -> tuple[pa.Table, np.ndarray | None]:
        """Every row of one main shard, left-joined, and which rows an inner join leaves out.

        The mask is None under a left join, or when no row lacks a feature row.
        """
        found = self._joined(shard, load=True)
        assert found is not None
        return found

    def read_decoded(self, shard: Shard) -> tuple[pa.Table, np.ndarray | None] | None:
        """``read_joined`` when it needs no read: every file decoded already, joins aligned.

        None otherwise (a file not decoded or being decoded, or a join by uid to make): the
        caller then reads the shard on its store's lane. A block whose shards are decoded
        does not queue behind other reads of the store.
        """
        return self._joined(shard, load=False)

    def _joined(self, shard: Shard, load: bool) -> tuple[pa.Table, np.ndarray | None] | None:
        table = self._cached(self.main, shard) if load else self._peek(self.main, shard)
        if table is None:
            return None
        missing: np.ndarray | None = None
        for view in self.views[1:]:
            joined = self._join(table, view, shard, load)
            if joined is None:
                return None
            table, absent = joined
            if self.join == "inner" and absent is not None:
                missing = absent if missing is None else missing | absent
        return table, missing

    def _peek(self, view: ShardsetView, shard: Shard) -> pa.Table | None:
        return self.cache.peek(self._key(view, shard))

    def _join(
        self, table: pa.Table, view: ShardsetView, main_shard: Shard, load: bool = True
    ) -> tuple[pa.Table, np.ndarray | None] | None:
        """``table`` with ``view``'s columns, and which rows lack them (None: every row has).

        Without ``load``, None unless the view's aligned shard is decoded already.
        """
        uid = self.dataset.uid_column_name
        names = view.columns[1:]
        absent: np.ndarray | None = None
        partner = view.aligned_with(main_shard)
        feature: pa.Table | None = None
        if partner is not None:
            feature = self._cached(view, partner) if load else self._peek(view, partner)
        if feature is None or not feature.column(uid).equals(table.column(uid)):
            if not load:
                return None
            feature, absent = self._by_uid(table.column(uid), view)
        for name in names:  # aligned: the columns as read, no copy
            table = table.append_column(view.schema.field(name), feature.column(name))
        return table, absent

    def _by_uid(
        self, uids: pa.ChunkedArray, view: ShardsetView
    ) -> tuple[pa.Table, np.ndarray | None]:
        """The view's columns for ``uids`` (nulls where it lacks one), and which it lacks."""
        uid = self.dataset.uid_column_name
        names = view.columns[1:]
        index = self._index(view)
        matches = index.lookup(uids)
        pieces, asked = [], []
        for shard_index, part in matches.by_shard():
            rows = self._cached(view, view.by_index[shard_index])
            pieces.append(rows.take(pa.array(matches.rows[part])))
            asked.append(matches.asked[part])
        target = np.full(len(uids), -1, dtype=np.int64)
        found = pa.concat_tables(pieces) if pieces else None
        if found is not None and found.num_rows:
            candidates = np.concatenate(asked)
            theirs = found.column(uid)
            ours = uids.take(pa.array(candidates))
            if theirs.type != ours.type:
                theirs = theirs.cast(ours.type)
            same = np.asarray(pc.equal(theirs, ours).to_numpy(zero_copy_only=False), dtype=bool)
            if index.exact and not same.all():
                log.warning(
                    "shardset %s: %d uid(s) are not where its uid index says: its files "
                    "changed without a sync? Sync it; those rows join as missing meanwhile",
                    view.shardset.id,
                    int((~same).sum()),
                )
            target[candidates[same]] = np.flatnonzero(same)
        absent = target < 0
        if found is None or absent.all():
            columns = {n: pa.nulls(len(uids), view.schema.field(n).type) for n in names}
            return pa.table(columns), (absent if len(uids) else None)
        feature = found.select(names).take(pa.array(target, mask=absent))
        return feature, (absent if absent.any() else None)

    def iter_rows(self, offset: int = 0, limit: int | None = None) -> Iterator[pa.Table]:
        """Joined rows ``offset .. offset + limit`` in dataset order, a main shard at a time."""
        remaining = self.total_rows if limit is None else limit
        start = 0
        for shard in self.main.shards:
            if remaining <= 0:
                return
            end = start + shard.num_rows
            if self.join == "inner" or end > offset:  # an inner join's counts are unknown
                table = self.read(shard)
                end = start + table.num_rows
                if end > offset:
                    piece = table.slice(max(0, offset - start), remaining)
                    remaining -= piece.num_rows
                    yield piece
            start = end
