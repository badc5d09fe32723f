"""Reading a dataset: its main shardset shard by shard, other shardsets joined by uid."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..catalog import Catalog, Dataset, Shard, Shardset
from ..catalog.errors import InvalidArgument, ShardNotFound, ShardsetNotFound
from .shards import declared_schema, read_shard
from .storage import Location, resolve_location

__all__ = ["DatasetReader", "ShardsetView"]


@dataclass
class ShardsetView:
    """One shardset as a read needs it: where it is, what it declares, which columns to read."""

    shardset: Shardset
    location: Location
    schema: pa.Schema
    columns: list[str]
    shards: list[Shard]

    def overlapping(self, low: object, high: object) -> list[Shard]:
        """The shards whose uid range meets ``[low, high]`` (all when ranges are unknown)."""
        found = []
        for shard in self.shards:
            if shard.num_rows == 0:
                continue
            if shard.uid_min is None or low is None:
                found.append(shard)
                continue
            try:
                if shard.uid_max < low or shard.uid_min > high:  # type: ignore[operator]
                    continue
            except TypeError:  # uids of mixed kinds: be safe, read it
                pass
            found.append(shard)
        return found


class DatasetReader:
    """Reads the joined rows of a dataset, one main shard at a time.

    The main shardset decides which samples exist and their order; every other selected
    shardset adds its columns by uid (left join: missing values are null). Only the
    shardsets and columns asked for are opened.
    """

    def __init__(
        self,
        catalog: Catalog,
        dataset: Dataset,
        shardset_ids: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        resolve: Callable[[str], Location] = resolve_location,
        cache_size: int = 4,
    ) -> None:
        self.dataset = dataset
        uid = dataset.uid_column_name
        main = dataset.main_shardset
        if main is None:
            raise InvalidArgument(f"dataset {dataset.name!r} has no shardset yet")
        by_id = {s.id: s for s in dataset.shardsets}
        chosen = list(dataset.shardsets) if shardset_ids is None else []
        for shardset_id in shardset_ids or ():
            if shardset_id not in by_id:
                raise ShardsetNotFound(
                    f"no shardset {shardset_id!r} in dataset {dataset.name!r}; "
                    f"it has {', '.join(by_id) or 'none'}"
                )
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
        self._cache: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # streams and prefetch threads share one reader

    @property
    def main_shards(self) -> list[Shard]:
        """The shards of the main shardset, in order."""
        return self.main.shards

    @property
    def total_rows(self) -> int:
        """Rows of the dataset (of its main shardset)."""
        return sum(shard.num_rows for shard in self.main.shards)

    def main_shard(self, index: int) -> Shard:
        """The main shard with catalog index ``index``."""
        for shard in self.main.shards:
            if shard.index == index:
                return shard
        raise ShardNotFound(f"no shard {index} in shardset {self.main.shardset.id}")

    def _read(self, view: ShardsetView, shard: Shard) -> pa.Table:
        """Read one shard of a view.

        Feature shards are cached, since neighbouring main shards often join with them.
        """
        if view is self.main:
            return self._read_uncached(view, shard)
        key = (view.shardset.id, shard.index)
        with self._lock:
            table = self._cache.get(key)
            if table is not None:
                self._cache.move_to_end(key)
                return table
        table = self._read_uncached(view, shard)
        with self._lock:
            self._cache[key] = table
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return table

    @staticmethod
    def _read_uncached(view: ShardsetView, shard: Shard) -> pa.Table:
        return read_shard(
            view.location,
            view.location.fs._strip_protocol(shard.location),
            shard.format,
            view.schema,
            view.columns,
            size=shard.size_bytes,  # known from the catalog: no size request to the store
        )

    def read(self, shard: Shard) -> pa.Table:
        """The joined rows of one main shard."""
        table = self._read(self.main, shard)
        for view in self.views[1:]:
            table = self._join(table, view, shard)
        return table

    def _join(self, table: pa.Table, view: ShardsetView, main_shard: Shard) -> pa.Table:
        uid = self.dataset.uid_column_name
        parts = [
            self._read(view, s) for s in view.overlapping(main_shard.uid_min, main_shard.uid_max)
        ]
        names = view.columns[1:]
        if len(parts) == 1 and parts[0].column(uid).equals(table.column(uid)):
            # Aligned shards (same uids, same order): attach the columns as they are.
            feature = parts[0]
        elif parts:
            other = pa.concat_tables(parts)
            positions = pc.index_in(table.column(uid), value_set=other.column(uid))
            feature = other.select(names).take(positions)
        else:
            feature = pa.table(
                {n: pa.nulls(table.num_rows, view.schema.field(n).type) for n in names}
            )
        for name in names:
            table = table.append_column(view.schema.field(name), feature.column(name))
        return table

    def iter_rows(self, offset: int = 0, limit: int | None = None) -> Iterator[pa.Table]:
        """Joined rows ``offset .. offset + limit`` in dataset order, a main shard at a time."""
        remaining = self.total_rows if limit is None else limit
        start = 0
        for shard in self.main.shards:
            if remaining <= 0:
                return
            end = start + shard.num_rows
            if end > offset:
                table = self.read(shard)
                skip = max(0, offset - start)
                piece = table.slice(skip, remaining)
                remaining -= piece.num_rows
                yield piece
            start = end
