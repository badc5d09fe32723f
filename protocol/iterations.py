"""Iteration payloads: the spec, commands, tickets, acks, batch metadata and progress."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import InvalidRequest
from .ranges import runs
from .records import _Record
from .wire import MAX_PAYLOAD_BYTES, Ranges, ShardTicket, WireModel, _Id, problems

__all__ = [
    "AckBody",
    "BatchMetadata",
    "IterationBody",
    "IterationCommand",
    "IterationSpec",
    "IterationTicket",
    "ListIterationsBody",
    "IterationProgress",
    "IterationRecord",
    "PluginCall",
    "RankProgress",
    "RankProgressRecord",
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


class IterationSpec(WireModel):
    """What an iteration delivers; ranks that join one iteration must send the same spec."""

    dataset_id: str = _Id
    shardsets: list[str] | None = Field(default=None, max_length=1000)
    columns: list[str] | None = Field(default=None, max_length=10_000)
    batch_size: int = Field(ge=1, le=1_000_000)
    shuffle: bool = False
    shuffle_seed: int | None = Field(default=None, ge=0, le=(1 << 63) - 1)
    shuffle_block_size: int = Field(default=4, ge=1, le=1_000_000)
    drop_last: bool = False
    world_size: int = Field(default=1, ge=1, le=65_536)
    replication_pg: list[list[int]] | None = Field(default=None, max_length=65_536)
    filters: list[PluginCall] = Field(default_factory=list, max_length=100)
    collater: PluginCall | None = None
    preprocessors: list[PluginCall] = Field(default_factory=list, max_length=100)
    max_retry_count: int = Field(default=0, ge=0, le=100)
    skip_on_failure: bool = False
    join: Literal["left", "inner"] = "left"


class IterationCommand(WireModel):
    """``get_flight_info`` command: create (or join) an iteration, or reopen one by id."""

    kind: Literal["iteration"] = "iteration"
    iteration_id: str | None = Field(default=None, pattern=_ITERATION_ID)
    spec: IterationSpec | None = None


class IterationTicket(WireModel):
    """``do_get`` ticket of an iteration: one rank's stream (or one worker's share of it)."""

    kind: Literal["iteration"] = "iteration"
    iteration_id: str = Field(pattern=_ITERATION_ID)
    rank: int = Field(default=0, ge=0, le=65_535)
    worker: int = Field(default=0, ge=0, le=1023)
    num_workers: int = Field(default=1, ge=1, le=1024)


class AckBody(WireModel):
    """``ack``: the local sequence ranges of batches a rank has consumed."""

    iteration_id: str = Field(pattern=_ITERATION_ID)
    rank: int = Field(default=0, ge=0, le=65_535)
    seq: Ranges = Field(max_length=1_000_000)


class IterationBody(WireModel):
    """Actions on one iteration."""

    iteration_id: str = Field(pattern=_ITERATION_ID)


class ListIterationsBody(WireModel):
    """``list_iterations``, of one dataset or all."""

    dataset_id: str | None = Field(default=None, max_length=128)


class BatchMetadata(WireModel):
    """The ``app_metadata`` (JSON) of every message of an iteration stream.

    A message's record batch holds one or more consecutive batches: ``batches`` lists each
    one's row count and the rank's local sequence ranges it carries (what to acknowledge,
    in the ``ack`` action). The dataset positions of the message's rows, in row order, are
    ``positions`` (``[start, stop)`` runs) when they run in order, else ``positions_i64``
    (base64 of little-endian int64s).
    """

    iteration_id: str
    rank: int
    batches: list[tuple[int, Ranges]]
    positions: Ranges | None = None
    positions_i64: str | None = None


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
    """An iteration as the catalog stores it: its spec and its frozen plan (opaque JSON)."""

    id: str
    dataset_id: str
    spec: dict[str, Any]
    plan: dict[str, Any]
    total: int
    created_at: float


class RankProgressRecord(_Record):
    """Progress of one rank, as ranges of its local sequence numbers."""

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
    """Where one rank of an iteration stands."""

    rank: int
    total: int
    current: int
    completed: int
    filtered: int
    failed: int
    inflight: int
    inflight_positions: list[int] = Field(default_factory=list)
    pending: int = 0
    streams: int = 0


class IterationProgress(BaseModel):
    """Progress of an iteration: the dashboard's four bars and the positions in flight.

    ``current`` counts samples handed out at least once, ``completed`` those acknowledged,
    ``filtered`` those a filter dropped, ``failed`` those skipped after errors; ``inflight``
    maps each rank to the dataset positions it holds but has not acknowledged.
    """

    id: str
    dataset_id: str
    spec: dict[str, Any]
    total: int
    current: int
    completed: int
    filtered: int
    failed: int
    inflight: dict[int, list[int]]
    ranks: list[RankProgress]
    created_at: float
    updated_at: float
    done: bool
