"""``IterationManager``: creates, reopens, serves and forgets iterations; keeps them healthy.

Live iterations are kept in memory while they are used and dropped when idle (their state
is in the catalog). A janitor thread keeps this server's part of the shared state right:
it says the server is alive (``nodes``, with what it serves: streams, samples/s), renews
the leases of the streams it serves, and frees the samples of streams whose server died or
whose lease ran out. ``live_locations`` lists the servers sharing the catalog
(``get_flight_info`` spreads ranks across them).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Sequence

from ...catalog import Catalog, new_id
from ...protocol.errors import (
    InvalidArgument,
    IterationBusy,
    IterationConflict,
    IterationNotFound,
)
from ...protocol.iterations import (
    CheckAnswer,
    IterationCommand,
    IterationProgress,
    IterationRecord,
    IterationSpec,
)
from ...transforms import DEFAULT_PLUGIN_TIMEOUT, Plugins
from ..pool import TransformPool
from ..service import LavenderService
from .changes import Changes, EpochViews
from .flow import ReadAhead
from .live import LiveIteration
from .plans import Plans
from .progress import iteration_progress
from .setup import IterationSetup
from .state import RankState
from .store import ProgressStore

__all__ = ["IterationManager"]

log = logging.getLogger(__name__)

PLANS_CACHED = 256
WARM_SECONDS = 10.0
"""A new iteration's first block is read as it is created (``LiveIteration.warm``); kept
this long for a stream that does not come, then let go."""
"""Plans (and mixture orders) kept for iterations whose progress is asked for without a
stream here."""


def _differences(stored: IterationSpec, asked: IterationSpec) -> str:
    a, b = stored.model_dump(mode="json"), asked.model_dump(mode="json")
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))


class IterationManager:
    """Creates, reopens and serves iterations (see the module docstring).

    Args:
        catalog: where iterations and their state live.
        service: datasets, shardsets and readers.
        plugins: the server's filters, collaters and preprocessors.
        workers: preprocessing worker processes (0: preprocess in the server process).
        read_threads: no longer used: blocks are read on the service's read pool
            (``LavenderService.read_pool``, sized by ``--read-threads``).
        lease_seconds: how long a stream's samples stay its own without a renewal.
        node: this server's id on the catalog (default: a fresh one).
        location: the URL clients reach this server at (registered with the node).
        node_timeout: seconds without a heartbeat after which a server counts as dead.
        idle_seconds: a live iteration with no stream for this long is dropped from memory.
        budget: the read-ahead budget of windowed streams.
    """

    def __init__(
        self,
        catalog: Catalog,
        service: LavenderService,
        plugins: Plugins | None = None,
        workers: int = 0,
        read_threads: int = 2,
        lease_seconds: float | None = None,
        node: str | None = None,
        location: str = "",
        node_timeout: float = 10.0,
        idle_seconds: float = 300.0,
        budget: ReadAhead | None = None,
    ) -> None:
        self.catalog = catalog
        self.service = service
        self.plugins = plugins or Plugins.load(entry_points=False)
        self.pool = (
            TransformPool(
                workers,
                self.plugins.modules_dir,
                timeout=self.plugins.timeout or DEFAULT_PLUGIN_TIMEOUT,
            )
            if workers > 0
            else None
        )
        self.node = node or new_id("nd")
        self.location = location
        self.node_timeout = node_timeout
        self.idle_seconds = idle_seconds
        self.budget = budget or ReadAhead()
        self.store = ProgressStore(catalog, self.node, lease_seconds or 300.0)
        self.started_at = time.time()
        self._sent_seen: dict[str, int] = {}
        self._beat_at: float | None = None
        self._live: dict[str, LiveIteration] = {}
        self._views: dict[str, EpochViews] = {}  # of iterations listed, not live here
        self._lock = threading.Lock()
        # one pool and one budget for the whole server: reads by store, blocks reserved
        self.reads = service.read_pool
        self.memory = service.memory
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None
        self._locations: tuple[float, list[str]] = (0.0, [])

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Register this server on the catalog and start the janitor thread."""
        self._heartbeat()
        self._janitor = threading.Thread(target=self._tend, name="lavender-janitor", daemon=True)
        self._janitor.start()

    def _heartbeat(self) -> None:
        """Say this server is alive, with its open streams and samples/s since the last beat."""
        live = self._all()
        now = time.monotonic()
        sent = {i.id: i.sent for i in live}
        # samples each live iteration sent since the last beat (one evicted meanwhile: its
        # last samples go uncounted; one new: all it sent)
        delta = sum(max(0, n - self._sent_seen.get(key, 0)) for key, n in sent.items())
        elapsed = now - self._beat_at if self._beat_at is not None else 0.0
        rate = delta / elapsed if elapsed > 0 else 0.0
        self._sent_seen, self._beat_at = sent, now
        info = json.dumps(
            {"streams": sum(len(i.open_streams) for i in live), "samples_per_s": round(rate, 1)}
        )
        self.catalog.heartbeat_node(self.node, self.location, self.started_at, info)

    # -- the servers on the catalog ------------------------------------------------------

    def live_locations(self) -> list[str]:
        """The URLs of the live servers on the catalog, oldest first, this one included.

        Every server answers the same list (the catalog's order), so the ranks and shards
        that ``get_flight_info`` spreads over it land alike whichever server was asked.
        Cached for a heartbeat's time: it is read by every ``get_flight_info``.
        """
        when, found = self._locations
        now = time.monotonic()
        if now - when < min(1.0, self.node_timeout / 4) and found:
            return found
        limit = time.time() - self.node_timeout
        found = []
        for node in self.catalog.list_nodes():
            alive = node.heartbeat_at >= limit or node.id == self.node
            if alive and node.location and node.location not in found:
                found.append(node.location)
        if self.location and self.location not in found:  # not registered yet (or evicted)
            found.append(self.location)
        self._locations = (now, found)
        return found

    def _all(self) -> list[LiveIteration]:
        with self._lock:
            return list(self._live.values())

    def _tend(self) -> None:
        beat = max(0.2, self.node_timeout / 4)
        renew = max(0.2, self.store.lease_seconds / 4)
        expire = max(0.2, min(self.store.lease_seconds, self.node_timeout) / 4)
        last_renew = last_expire = 0.0
        last_beat = time.monotonic()  # start() beat
        beating_since = float("-inf")  # since when this server's beats get through
        while not self._stop.wait(min(beat, expire)):
            try:
                self._heartbeat()
                now = time.monotonic()
                if now - last_beat > self.node_timeout:  # its own beats lapsed (an outage,
                    beating_since = now  # a call that waited it out): the others' too, maybe
                last_beat = now
                if now - last_renew >= renew:
                    self.store.renew([h for i in self._all() for h in i.open_streams])
                    last_renew = now
                if now - last_expire >= expire:
                    # after an outage of the catalog every server's heartbeat looks old: the
                    # others get a whole timeout to beat again before any is taken for dead
                    trusted = now - beating_since >= self.node_timeout
                    self.store.expire(self.dead_nodes() if trusted else ())
                    last_expire = now
                self._evict_idle()
            except Exception as exc:  # the catalog is down: try again next round
                log.warning("keeping iteration state: %s", exc)

    def dead_nodes(self) -> list[str]:
        """Servers whose heartbeat lapsed (never this one: it runs)."""
        limit = time.time() - self.node_timeout
        return [
            n.id for n in self.catalog.list_nodes() if n.heartbeat_at < limit and n.id != self.node
        ]

    def _evict_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            for iteration_id, live in list(self._live.items()):
                if live.open_streams:
                    continue
                if now - live.last_used > self.idle_seconds:
                    del self._live[iteration_id]
                    live.blocks.clear()
                elif now - live.last_used > WARM_SECONDS:  # warmed, and nobody came
                    live.blocks.clear()

    def close(self) -> None:
        """Stop the janitor, the read threads and the workers; leave the catalog."""
        self._stop.set()
        if self._janitor is not None:
            self._janitor.join(timeout=5)
        if self.pool is not None:
            self.pool.close()
        try:
            self.catalog.remove_node(self.node)
        except Exception as exc:
            log.info("could not unregister this server: %s", exc)

    def park(self) -> int:
        """End the streams of this server (it is stopping); how many samples they held.

        What they held (sent or not, ended streams' too) returns to pending, saved at once
        (a stream blocked on a client that stopped reading ends only when its connection is
        cut); a resume delivers it.
        """
        for iteration in self._all():
            iteration.park()
        try:
            return self.store.release_node()
        except Exception as exc:  # the catalog is down: they wait for the node timeout
            log.warning("could not save what this server's streams held: %s", exc)
            return 0

    # -- iterations ----------------------------------------------------------------------

    def _make(
        self, record: IterationRecord, setup: IterationSetup, carry_over: bool = True
    ) -> LiveIteration:
        live = LiveIteration(
            record, setup, self.store, self.reads, self.pool, self.budget, self.memory
        )
        if carry_over:
            self._carry_over(record, setup)
        return live

    def _carry_over(self, record: IterationRecord, setup: IterationSetup) -> None:
        """Progress saved before epochs existed becomes epoch 0's state (once)."""
        legacy = {r.rank: r for r in self.catalog.load_progress(record.id)}
        if not legacy:
            return

        def apply(rows: dict) -> None:
            for rank, row in rows.items():
                old = legacy.get(rank)
                if row.state is None and old is not None:
                    state = RankState.carried_over(
                        setup.rank_size(rank),
                        setup.spec.batch_size,
                        old.acked,
                        old.filtered_acked + sum(b - a for a, b in old.filtered),
                        old.failed_acked + sum(b - a for a, b in old.failed),
                    )
                    for a, b in [*old.filtered, *old.failed]:
                        state.finished.add(a, b)
                        state.covered.add(a, b)
                    row.set(state.to_json(), None, ())

        self.catalog.update_rank_states(record.id, 0, sorted(legacy), apply)
        self.catalog.drop_progress(record.id)
        log.info("iteration %s: progress of %d rank(s) carried over to epochs", record.id,
                 len(legacy))  # fmt: skip

    def get(self, iteration_id: str) -> LiveIteration:
        """A live iteration, loaded from the catalog when needed (e.g. after a restart)."""
        with self._lock:
            live = self._live.get(iteration_id)
        if live is not None and not live.deleted:
            return live
        record = self.catalog.get_iteration(iteration_id)
        setup = IterationSetup.build(record.spec, self.service, self.plugins, plan=record.plan)
        with self._lock:
            live = self._live.get(iteration_id)
            if live is None or live.deleted:  # deleted through another server, made again
                live = self._live[iteration_id] = self._make(record, setup)
        return live

    def open(self, command: IterationCommand) -> LiveIteration:
        """Create an iteration, join the one of the same id and spec, or reopen one by id.

        With ``world_size`` (and an id), reopen it dealt to that many ranks (elastic resume).
        """
        return self.opened(command)[0]

    def opened(self, command: IterationCommand) -> tuple[LiveIteration, bool]:
        """``open``, and whether this call created the iteration (nothing changed it since)."""
        if command.world_size is not None:
            if command.iteration_id is None or command.spec is not None:
                raise InvalidArgument(
                    "world_size reopens an existing iteration by its id, without a spec "
                    "(Iteration.resume(iteration_id, rank=r, world_size=w))"
                )
            live = self.get(command.iteration_id)
            live.resize(command.world_size, self.dead_nodes())
            return live, False
        if command.spec is None:
            if command.iteration_id is None:
                raise InvalidArgument("give an iteration spec, an iteration_id, or both")
            return self.get(command.iteration_id), False
        spec = command.spec
        iteration_id = command.iteration_id or new_id("it")
        if command.iteration_id is not None:
            try:
                stored = self.catalog.get_iteration(iteration_id)
            except IterationNotFound:
                pass
            else:
                self._check_same(stored, spec)
                return self.get(iteration_id), False
        seed = spec.shuffle_seed if spec.shuffle_seed is not None else secrets.randbits(63)
        setup = IterationSetup.build(spec, self.service, self.plugins, seed=seed)  # typos fail here
        record = IterationRecord(
            id=iteration_id,
            dataset_id=spec.dataset_id,
            spec=spec,
            plan=setup.plan,
            total=setup.total,
            created_at=time.time(),
        )
        stored, created = self.catalog.create_iteration(record)
        if not created:  # another rank created it meanwhile
            self._check_same(stored, spec)
            return self.get(iteration_id), False
        log.info("iteration %s: %d samples per epoch over dataset %s", iteration_id,
                 setup.total, spec.dataset_id)  # fmt: skip
        log.debug("iteration %s: %s", iteration_id, spec.model_dump_json())
        with self._lock:  # a new iteration: no progress of before epochs to carry over
            live = self._live[iteration_id] = self._make(record, setup, carry_over=False)
        live.just_created()
        live.warm()
        return live, True

    def check(self, command: IterationCommand) -> CheckAnswer:
        """Check a command as ``open`` would, creating nothing."""
        if command.iteration_id is not None:
            try:
                stored = self.catalog.get_iteration(command.iteration_id)
            except IterationNotFound:
                if command.spec is None:
                    raise
            else:
                if command.spec is not None:
                    self._check_same(stored, command.spec)
                return CheckAnswer(exists=True, total=stored.total)
        assert command.spec is not None
        setup = IterationSetup.build(command.spec, self.service, self.plugins)
        return CheckAnswer(exists=False, total=setup.total)

    @staticmethod
    def _check_same(stored: IterationRecord, spec: IterationSpec) -> None:
        if stored.spec != spec:
            raise IterationConflict(
                f"iteration {stored.id!r} exists with another spec "
                f"({_differences(stored.spec, spec)}): ranks of one job must pass the "
                "same arguments; pick a new iteration_id for a new run"
            )

    def progress(self, iteration_id: str, ranks: bool = True) -> IterationProgress:
        """Where an iteration stands (live here or not: no reader is built for it)."""
        with self._lock:
            live = self._live.get(iteration_id)
        if live is not None:
            return live.progress(ranks=ranks)
        return self._progress_of(self.catalog.get_iteration(iteration_id), ranks)

    def _progress_of(self, record: IterationRecord, ranks: bool) -> IterationProgress:
        with self._lock:
            live = self._live.get(record.id)
            views = self._views.get(record.id)
            if views is not None and views.setup.asked != record.spec:
                views = None  # deleted and made again under the same id
            if live is None and views is None:
                views = self._views[record.id] = EpochViews(Plans(record.spec, record.plan))
                while len(self._views) > PLANS_CACHED:
                    self._views.pop(next(iter(self._views)))
        if live is not None:
            return live.progress(ranks=ranks)
        assert views is not None
        version, changes = self.catalog.load_changes(record.id)  # weights, deals
        views.update(Changes.from_records(version, changes))
        rows = self.catalog.latest_rank_states(record.id)
        return iteration_progress(record, views, rows, ranks=ranks)

    def list(
        self,
        dataset_id: str | None = None,
        ranks: bool = False,
        offset: int = 0,
        limit: int | None = None,
        state: str | None = None,
    ) -> list[IterationProgress]:
        """Progress of the iterations (of one dataset), newest first; one page of them.

        ``state`` ``"running"`` or ``"done"`` keeps those only; ``offset`` and ``limit``
        cut the page after that filter. Only the page's iterations are loaded: without a
        state filter the catalog cuts the page; with one, each candidate's rank states are
        read (no setup) until the page is full.
        """
        if state is None:
            records = self.catalog.list_iterations(dataset_id, offset=offset, limit=limit)
        else:
            records = []
            skipped = 0
            for record in self.catalog.list_iterations(dataset_id):
                if limit is not None and len(records) >= limit:
                    break
                try:
                    if self._done(record) != (state == "done"):
                        continue
                except IterationNotFound:  # deleted meanwhile
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                records.append(record)
        found = []
        for record in records:
            try:
                found.append(self._progress_of(record, ranks))
            except IterationNotFound:  # deleted meanwhile
                continue
        return found

    def _done(self, record: IterationRecord) -> bool:
        """Whether an iteration is done, as its progress says (no reader is built for it)."""
        return self._progress_of(record, ranks=False).done

    def busy(self, iteration_id: str) -> int:
        """Open streams of an iteration, on any server."""
        return sum(len(state.streams) for _, state in self.store.latest(iteration_id).values())

    def _busy(self, records: Sequence[IterationRecord]) -> dict[str, int]:
        """The iterations among ``records`` with open streams (on any server), and how many."""
        found = {}
        for record in records:
            streams = self.busy(record.id)
            if streams:
                found[record.id] = streams
        return found

    @staticmethod
    def _refusal(busy: dict[str, int], what: str) -> IterationBusy:
        named = ", ".join(f"{i} ({n} open stream{'s' if n > 1 else ''})" for i, n in busy.items())
        if len(busy) == 1:
            return IterationBusy(
                f"{what} has a live iteration: {named}; stop the job that reads it, or "
                "delete with force=True (which ends it first: its readers get "
                "IterationNotFound)"
            )
        return IterationBusy(
            f"{what} has {len(busy)} live iterations: {named}; stop the jobs that read "
            "them, or delete with force=True (which ends them first: their readers get "
            "IterationNotFound)"
        )

    def _end(self, iteration_id: str) -> None:
        """Stop serving an iteration here; its streams end with ``IterationNotFound``."""
        with self._lock:
            live = self._live.pop(iteration_id, None)
        if live is not None:
            live.deleted = True
            live.park()

    def delete(self, iteration_id: str, force: bool = False) -> None:
        """Forget an iteration; one with open streams only with ``force`` (they end)."""
        self.catalog.get_iteration(iteration_id)  # IterationNotFound first
        streams = self.busy(iteration_id)
        if streams and not force:
            raise IterationBusy(
                f"iteration {iteration_id} has {streams} open stream(s): stop the job that "
                "reads it, or delete it with force=True (its readers then get "
                "IterationNotFound)"
            )
        self._end(iteration_id)
        self.catalog.delete_iteration(iteration_id)

    def delete_dataset(self, dataset_id: str, force: bool = False) -> None:
        """Delete a dataset and its iterations; with live ones only with ``force``.

        ``force`` ends the live iterations first (their readers get ``IterationNotFound``),
        then the dataset goes (its shard files stay).
        """
        self.service.get_dataset(dataset_id=dataset_id)  # DatasetNotFound first
        records = self.catalog.list_iterations(dataset_id)
        busy = self._busy(records)
        if busy and not force:
            raise self._refusal(busy, f"dataset {dataset_id}")
        for record in records:
            self._end(record.id)
        self.service.delete_dataset(dataset_id)

    def delete_shardset(self, dataset_id: str, shardset_id: str, force: bool = False) -> None:
        """Delete a shardset; one that live iterations read only with ``force``.

        An iteration reads the dataset's main shardset and those its spec names (all of
        them when it names none). ``force`` deletes the live ones first (their readers get
        ``IterationNotFound``); the others stay, and are set up again from the catalog when
        next used.
        """
        shardset = self.service.get_shardset(dataset_id, shardset_id)  # not found first
        records = [
            r
            for r in self.catalog.list_iterations(dataset_id)
            if shardset.is_main or r.spec.shardsets is None or shardset_id in r.spec.shardsets
        ]
        busy = self._busy(records)
        if busy and not force:
            raise self._refusal(busy, f"shardset {shardset_id}")
        for iteration_id in busy:
            self._end(iteration_id)
            try:
                self.catalog.delete_iteration(iteration_id)
            except IterationNotFound:  # deleted meanwhile
                pass
        self.service.delete_shardset(dataset_id, shardset_id)
        with self._lock:  # their setup read the shardset: build it again when used
            for record in records:
                self._live.pop(record.id, None)
