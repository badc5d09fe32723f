"""Iteration payloads: the spec, commands, tickets, acks, batch metadata and progress."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

from .errors import InvalidRequest
from .ranges import runs
from .records import _Record
from .wire import MAX_PAYLOAD_BYTES, Answer, Ranges, ShardTicket, WireModel, _Id, problems

__all__ = [
    "MAX_MIXTURE_SOURCES",
    "MAX_WORLD_SIZE",
    "NodeInfo",
    "AckBody",
    "BatchMetadata",
    "batch_metadata_json",
    "CheckAnswer",
    "DeleteIterationBody",
    "IterationBody",
    "IterationCommand",
    "IterationInfo",
    "IterationPlan",
    "IterationSpec",
    "IterationTicket",
    "ListIterationsBody",
    "IterationProgress",
    "MixtureProgress",
    "MixtureSourceSpec",
    "MixtureWeightsBody",
    "OnExhausted",
    "IterationRecord",
    "PluginCall",
    "RankProgress",
    "RankProgressRecord",
    "SAMPLE_GROUP",
    "SourceProgress",
    "WeightChange",
    "WeightsSet",
    "decode_positions",
    "decode_ticket",
    "encode_positions",
]

_ITERATION_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"


class PluginCall(BaseModel):
    """A filter, collater or preprocessor by name, with its parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    params: dict[str, Any] = Field(default_factory=dict)


MAX_WORLD_SIZE = 16_384
"""The most ranks one iteration may have (each rank's progress is kept and reported)."""
MAX_MIXTURE_SOURCES = 256
"""The most sources one mixture may draw from."""

OnExhausted = Literal["stop", "cycle", "rebalance"]
"""What a mixture does when a source runs out: end the epoch, start the source's next
(reshuffled) pass, or go on with the others (their weights renormalized)."""


class MixtureSourceSpec(BaseModel):
    """One source of a mixture: a dataset (its shardsets, columns, filters) and its weight."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = _Id
    weight: float = Field(ge=0, allow_inf_nan=False)
    shardsets: list[str] | None = Field(default=None, max_length=1000)
    columns: list[str] | None = Field(default=None, max_length=10_000)
    filters: list[PluginCall] = Field(default_factory=list, max_length=100)


class IterationSpec(WireModel):
    """What an iteration delivers; ranks that join one iteration must send the same spec.

    ``epochs``: how many passes the iteration makes (None: as many as the job asks for;
    each new pass over the iteration is the next epoch, shuffled anew). ``batch_size`` 0
    delivers single samples (the server sends them in groups of ``SAMPLE_GROUP``, what the
    client acknowledges). ``mixture``: draw from several datasets by weight (then
    ``dataset_id`` is the first source's and ``shardsets``/``columns`` are per source);
    ``source_column`` adds a column naming each row's source dataset. ``categorizer``:
    every batch holds samples of one category.
    """

    dataset_id: str = _Id
    shardsets: list[str] | None = Field(default=None, max_length=1000)
    columns: list[str] | None = Field(default=None, max_length=10_000)
    batch_size: int = Field(ge=0, le=1_000_000)
    shuffle: bool = False
    shuffle_seed: int | None = Field(default=None, ge=0, le=(1 << 63) - 1)
    shuffle_block_size: int = Field(default=4, ge=1, le=1_000_000)
    drop_last: bool = False
    world_size: int = Field(default=1, ge=1, le=MAX_WORLD_SIZE)
    replication_pg: list[list[int]] | None = Field(default=None, max_length=MAX_WORLD_SIZE)
    filters: list[PluginCall] = Field(default_factory=list, max_length=100)
    collater: PluginCall | None = None
    preprocessors: list[PluginCall] = Field(default_factory=list, max_length=100)
    max_retry_count: int = Field(default=0, ge=0, le=100)
    skip_on_failure: bool = False
    join: Literal["left", "inner"] = "left"
    epochs: int | None = Field(default=None, ge=1, le=1_000_000)
    mixture: list[MixtureSourceSpec] | None = Field(
        default=None, min_length=1, max_length=MAX_MIXTURE_SOURCES
    )
    on_exhausted: OnExhausted = "stop"
    source_column: str | None = Field(default=None, min_length=1, max_length=256)
    categorizer: PluginCall | None = None


SAMPLE_GROUP = 64
"""Single samples (``batch_size`` 0) travel and are acknowledged in groups of this many."""


class IterationPlan(BaseModel):
    """What an iteration froze when it was created: the main shards it reads, and its seed.

    Every epoch reads the same shards (their row counts as they were then); epoch ``e``
    shuffles with a seed derived from ``seed`` and ``e``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    shards: list[tuple[int, int]]
    """``(shard index, rows)`` of each main shard, in shard order (a mixture: empty)."""
    seed: int
    sources: list[list[tuple[int, int]]] | None = None
    """A mixture: the main shards of each source, as ``shards``."""
    order_version: int = Field(default=1, ge=1)
    """How a shuffled block's order is drawn (the engine's ``plan.ORDER_VERSION``, frozen at
    creation). 1: iterations created before the version existed (absent from their record)."""


class IterationCommand(WireModel):
    """``get_flight_info`` command: create (or join) an iteration, or reopen one by id."""

    kind: Literal["iteration"] = "iteration"
    iteration_id: str | None = Field(default=None, pattern=_ITERATION_ID)
    spec: IterationSpec | None = None
    world_size: int | None = Field(default=None, ge=1, le=MAX_WORLD_SIZE)
    """Reopen with this many ranks: what is not completed is dealt anew (elastic resume)."""


class CheckAnswer(WireModel):
    """``check_iteration``: the spec is valid; whether the iteration exists, and its size."""

    exists: bool
    total: int
    """Samples per epoch, every rank together."""


class IterationInfo(WireModel):
    """The ``app_metadata`` of an iteration's FlightInfo: what the iteration is."""

    iteration_id: str
    spec: IterationSpec
    seed: int
    """The shuffle seed in use (the one the server chose when the spec gave none)."""
    total: int
    """Samples per epoch, every rank together."""
    world_size: int | None = None
    """The ranks it has now (None: the spec's; another after an elastic resume)."""
    created: bool = False
    """This call created it: every rank is at the start of epoch 0 (a client need not ask
    where its rank stands before its first loop)."""


class IterationTicket(WireModel):
    """``do_get`` ticket of an iteration: one rank's stream (or one worker's share of it).

    ``epoch`` None streams the epoch the rank is in (its latest; 0 at first). A client that
    sets ``window`` reports the batches its loop takes (``ack`` with ``taken``), and the
    server keeps what it sends ahead of the loop within a small budget; without it, the
    server sends as fast as the client reads. ``positions`` asks for the dataset positions
    of every row in the metadata. ``session``: who streams (a token our client picks per
    ``Iteration``); a stream takes over the earlier one of the same session and worker (a
    reconnect, maybe through another server), while streams of other sessions share the
    rank's work. Tickets without one are all of one session. ``takeover`` (a resumed job)
    ends the rank's streams of every other session first: what they held is streamed here.
    ``worker_chunks``: the rank's chunks (batches) are dealt to its ``num_workers`` workers
    in runs of this many: worker ``w`` streams run ``r`` when ``r % num_workers == w`` (a
    DataLoader takes that many batches from each worker in turn; a run's rows are
    consecutive, sent without a copy).
    """

    kind: Literal["iteration"] = "iteration"
    iteration_id: str = Field(pattern=_ITERATION_ID)
    rank: int = Field(default=0, ge=0, lt=MAX_WORLD_SIZE)
    worker: int = Field(default=0, ge=0, le=1023)
    num_workers: int = Field(default=1, ge=1, le=1024)
    worker_chunks: int = Field(default=1, ge=1, le=65536)
    epoch: int | None = Field(default=None, ge=0, le=1_000_000)
    window: bool = False
    positions: bool = False
    session: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,64}$")
    takeover: bool = False

    @model_serializer(mode="wrap")
    def _without_default_runs(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a ticket without runs reads as before they existed (a server of the version
        # before refuses fields it does not know)
        found: dict[str, Any] = handler(self)
        if found.get("worker_chunks") == 1:
            del found["worker_chunks"]
        return found


class AckBody(WireModel):
    """``ack``: the batches a rank's loop has taken, and those it has completed.

    Ranges are the local sequence ranges of the batch metadata (``seq``). A completed batch
    counts as taken too. ``seq`` is the older name of ``completed``. ``epoch`` None: the
    epoch the rank is in.
    """

    iteration_id: str = Field(pattern=_ITERATION_ID)
    rank: int = Field(default=0, ge=0, lt=MAX_WORLD_SIZE)
    epoch: int | None = Field(default=None, ge=0, le=1_000_000)
    deal: int | None = Field(default=None, ge=0, le=1_000_000)
    """The deal of the batch metadata (None: the rank's current one)."""
    taken: Ranges = Field(default_factory=list, max_length=1_000_000)
    completed: Ranges = Field(
        default_factory=list,
        max_length=1_000_000,
        validation_alias=AliasChoices("completed", "seq"),
    )


class IterationBody(WireModel):
    """Actions on one iteration."""

    iteration_id: str = Field(pattern=_ITERATION_ID)


class DeleteIterationBody(WireModel):
    """``delete_iteration``: ``force`` ends its live streams first (else they refuse it)."""

    iteration_id: str = Field(pattern=_ITERATION_ID)
    force: bool = False


class NodeInfo(BaseModel):
    """A server registered on the catalog (the ``list_nodes`` action answers a list)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    location: str
    """The URL clients reach it at (``--advertise``, or its host and port)."""
    started_at: float
    heartbeat_at: float
    alive: bool
    """Its heartbeat is recent (within the servers' ``--node-timeout``)."""
    streams: int = 0
    """Iteration streams it is sending now."""
    samples_per_s: float = 0.0
    """Samples it sent per second lately."""


class MixtureWeightsBody(WireModel):
    """``set_mixture_weights``: new weights of some sources (by dataset id), for every rank.

    They take effect at the first seq no rank has been handed yet (or at ``at``, when no
    rank has been handed it yet), in the epoch the ranks are in and the next ones.
    """

    iteration_id: str = Field(pattern=_ITERATION_ID)
    weights: dict[str, float] = Field(min_length=1, max_length=MAX_MIXTURE_SOURCES)
    at: int | None = Field(default=None, ge=0, le=1 << 62)


class WeightChange(BaseModel):
    """Weights in force from ``from_seq`` of ``epoch`` on (the first entry: the spec's)."""

    epoch: int
    from_seq: int
    weights: dict[str, float]
    """By source dataset id."""
    at: float
    """When the change was made (seconds since the epoch)."""


class WeightsSet(Answer):
    """``set_mixture_weights``: where the new weights took effect."""

    epoch: int
    from_seq: int
    weights: dict[str, float]
    total: int
    """The epoch's samples with the new weights (every rank together)."""


class ListIterationsBody(WireModel):
    """``list_iterations``, of one dataset or all, newest first; a page of them.

    ``ranks`` adds each rank's progress; ``state`` keeps the ``running`` (not done) or the
    ``done`` ones; ``offset`` skips that many (after the filters); ``limit`` answers at
    most that many (None: all).
    """

    dataset_id: str | None = Field(default=None, max_length=128)
    ranks: bool = False
    state: Literal["running", "done"] | None = None
    offset: int = Field(default=0, ge=0, le=1 << 40)
    limit: int | None = Field(default=None, ge=1, le=10_000)


class BatchMetadata(WireModel):
    """The ``app_metadata`` (JSON) of every message of an iteration stream.

    A message's record batch holds one or more consecutive batches: ``batches`` lists each
    one's row count and the rank's local sequence ranges it carries (what to acknowledge,
    in the ``ack`` action). When the ticket asked for them, the dataset positions of the
    message's rows, in row order, are ``positions`` (``[start, stop)`` runs) when they run
    in order, else ``positions_i64`` (base64 of little-endian int64s). ``report_every``
    (windowed streams): report taken batches at least every that many samples.
    """

    iteration_id: str
    rank: int
    epoch: int = 0
    deal: int | None = None
    """The deal the seq ranges belong to, after an elastic resume (send it with ``ack``)."""
    batches: list[tuple[int, Ranges]]
    positions: Ranges | None = None
    positions_i64: str | None = None
    report_every: int | None = None


def batch_metadata_json(
    iteration_id: str,
    rank: int,
    epoch: int,
    batches: list[tuple[int, Ranges]],
    deal: int | None = None,
    report_every: int | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """``BatchMetadata(...)`` as its JSON, without building the model first.

    The server sends one per message, of up to hundreds of batches: validating them into
    a model only to dump them again cost it more than the rest of a message. ``extra``:
    the positions fields (``encode_positions``). Parsed by ``BatchMetadata``, it gives the
    model the same arguments would have built (a test checks).
    """
    fields: dict[str, Any] = {"iteration_id": iteration_id, "rank": rank, "epoch": epoch}
    if deal is not None:
        fields["deal"] = deal
    fields["batches"] = batches
    if extra:
        fields.update(extra)
    if report_every is not None:
        fields["report_every"] = report_every
    return json.dumps(fields, separators=(",", ":")).encode()


def encode_positions(positions: np.ndarray, max_runs: int = 32) -> dict[str, Any]:
    """The ``positions`` or ``positions_i64`` field of ``BatchMetadata``."""
    found = runs(positions, limit=max_runs)
    if found is not None:
        return {"positions": found}
    return {"positions_i64": base64.b64encode(positions.astype("<i8").tobytes()).decode()}


def decode_positions(metadata: dict[str, Any]) -> np.ndarray:
    """The dataset positions a message's metadata names."""
    if metadata.get("positions_i64") is not None:
        return np.frombuffer(base64.b64decode(metadata["positions_i64"]), dtype="<i8")
    return np.concatenate(
        [np.arange(a, b, dtype=np.int64) for a, b in metadata.get("positions") or []]
        or [np.zeros(0, dtype=np.int64)]
    )


Ticket = Annotated[ShardTicket | IterationTicket, Field(discriminator="kind")]
_TICKET: TypeAdapter[ShardTicket | IterationTicket] = TypeAdapter(Ticket)


def decode_ticket(payload: bytes) -> ShardTicket | IterationTicket:
    """Parse a ``do_get`` ticket of either kind, or raise ``InvalidRequest``."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidRequest(f"ticket is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    try:
        return _TICKET.validate_json(payload)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid ticket: {problems(exc)}") from None


class IterationRecord(_Record):
    """An iteration as the catalog stores it: its spec and its frozen plan."""

    id: str
    dataset_id: str
    spec: IterationSpec
    plan: IterationPlan
    total: int
    """Samples per epoch, every rank together."""
    created_at: float


class RankProgressRecord(_Record):
    """Progress of one rank as catalog schema 4 kept it (before epochs).

    Read once, to carry an iteration created then over to epoch-aware progress.
    """

    iteration_id: str
    rank: int
    acked: list[tuple[int, int]] = Field(default_factory=list)
    filtered: list[tuple[int, int]] = Field(default_factory=list)
    failed: list[tuple[int, int]] = Field(default_factory=list)
    inflight: list[tuple[int, int]] = Field(default_factory=list)
    filtered_acked: int = 0
    failed_acked: int = 0
    updated_at: float = 0.0


class RankProgress(BaseModel):
    """Where one rank of an iteration stands in its current epoch, as its loop sees it.

    ``current``: samples the loop has taken (their batches handed to the loop, filtered and
    failed ones on their way included); ``completed``: delivered samples the loop finished;
    ``inflight``: taken, not completed; ``read_ahead``: sent or claimed by the server ahead
    of the loop (bounded by ``read_ahead_limit`` for windowed streams); ``pending``: to be
    handed out again (pushed back, or left by a stream that ended).
    """

    rank: int
    epoch: int = 0
    total: int
    current: int
    completed: int
    filtered: int
    failed: int
    inflight: int
    read_ahead: int = 0
    read_ahead_limit: int | None = None
    inflight_positions: list[int] = Field(default_factory=list)
    pending: int = 0
    streams: int = 0
    """Streams sending now."""
    opened: int = 0
    """Streams opened in this epoch (a DataLoader's workers open one each)."""
    nodes: list[str] = Field(default_factory=list)
    """The servers (node ids, see ``list_nodes``) serving the rank's streams now."""
    done: bool = False


class SourceProgress(BaseModel):
    """One source of a mixture in the epoch the ranks are in.

    ``size``: its samples per pass; ``drawn``: its samples the loops reached (as
    ``current``); ``finished``: of those, the ones whose batches were completed (filtered
    and failed ones included); ``passes``: passes started (``"cycle"`` starts more than
    one); ``exhausted``: it ran out (``"stop"`` ends the epoch then, ``"rebalance"`` goes
    on without it).
    """

    dataset_id: str
    weight: float
    """In force now."""
    size: int
    drawn: int = 0
    finished: int = 0
    passes: int = 1
    exhausted: bool = False


class MixtureProgress(BaseModel):
    """A mixture's sources and its weights over time (what the iteration page draws)."""

    on_exhausted: OnExhausted
    sources: list[SourceProgress]
    schedule: list[WeightChange]
    """Every weight change, oldest first, the spec's weights first (epoch 0, seq 0)."""


class IterationProgress(BaseModel):
    """Progress of an iteration: the dashboard's four bars and what is in flight.

    Counts add the ranks up, each in its current epoch (``epoch`` is the latest of them).
    ``inflight`` maps each rank to the dataset positions its loop holds (taken, not
    completed; the first thousand). ``read_ahead`` is what the server holds ahead of the
    loops. ``done``: every rank finished its current epoch (and, with ``epochs``, the last).
    ``world_size``: its ranks now (another than the spec's after an elastic resume; ``deal``
    counts the resizes of the current epoch). ``mixture``: a mixture's sources.
    """

    id: str
    dataset_id: str
    spec: IterationSpec
    seed: int
    epoch: int = 0
    total: int
    current: int
    completed: int
    filtered: int
    failed: int
    inflight: dict[int, list[int]]
    read_ahead: int = 0
    ranks: list[RankProgress]
    created_at: float
    updated_at: float
    done: bool
    world_size: int | None = None
    deal: int = 0
    mixture: MixtureProgress | None = None
