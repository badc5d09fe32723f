"""Typed wire payloads: action bodies, tickets and commands are JSON of these models.

Every payload has a version field ``v`` so the format can evolve; unknown fields, wrong
types and oversized values are refused before anything runs.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import InvalidArgument, InvalidRequest
from .ranges import runs
from .records import ColumnOptions

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "AckBody",
    "BatchMetadata",
    "IterationBody",
    "IterationCommand",
    "IterationSpec",
    "IterationTicket",
    "ListIterationsBody",
    "PluginCall",
    "CreateDatasetBody",
    "CreateShardsetBody",
    "DatasetBody",
    "Empty",
    "GetDatasetBody",
    "PreviewBody",
    "PutShardCommand",
    "ShardTicket",
    "ShardsetBody",
    "WireModel",
    "build",
    "decode",
    "decode_positions",
    "decode_ticket",
    "encode",
    "encode_positions",
    "problems",
]

MAX_PAYLOAD_BYTES = 1 << 20
_Id = Field(min_length=1, max_length=128)


class WireModel(BaseModel):
    """Base of every payload: strict about unknown fields, versioned."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1


class Empty(WireModel):
    """A body with nothing in it."""


class CreateDatasetBody(WireModel):
    """``create_dataset``."""

    name: str = Field(min_length=1, max_length=256)
    uid_column_name: str = Field(default="uid", min_length=1, max_length=256)


class GetDatasetBody(WireModel):
    """``get_dataset``: by id or by name."""

    dataset_id: str | None = Field(default=None, max_length=128)
    name: str | None = Field(default=None, max_length=256)


class DatasetBody(WireModel):
    """Actions on one dataset."""

    dataset_id: str = _Id


class CreateShardsetBody(WireModel):
    """``create_shardset``: columns may be omitted to infer them from the first shard.

    ``storage_options`` are fsspec options of the location (s3fs: ``key``, ``secret``,
    ``endpoint_url``, ``client_kwargs``...), laid over the server's defaults.
    """

    dataset_id: str = _Id
    location: str = Field(min_length=1, max_length=4096)
    columns: list[ColumnOptions] | None = Field(default=None, max_length=10_000)
    is_main: bool = False
    storage_options: dict[str, Any] | None = Field(default=None, max_length=100)


class LocationBody(WireModel):
    """``infer_columns``: a shardset location to look at."""

    location: str = Field(min_length=1, max_length=4096)


class ShardsetBody(WireModel):
    """Actions on one shardset."""

    dataset_id: str = _Id
    shardset_id: str = _Id


class PreviewBody(WireModel):
    """``preview_dataset``."""

    dataset_id: str = _Id
    offset: int = Field(default=0, ge=0, le=1 << 62)
    limit: int = Field(default=10, ge=0, le=10_000)
    columns: list[str] | None = Field(default=None, max_length=10_000)
    join: Literal["left", "inner"] = "left"


class ShardTicket(WireModel):
    """``do_get`` ticket of the plain read path: one main shard of a dataset, joined."""

    kind: Literal["shard"] = "shard"
    dataset_id: str = _Id
    shard_index: int = Field(ge=0, le=1 << 40)
    shardset_ids: list[str] | None = Field(default=None, max_length=1000)
    columns: list[str] | None = Field(default=None, max_length=10_000)
    join: Literal["left", "inner"] = "left"


class PutShardCommand(WireModel):
    """``do_put`` descriptor command: write one shard through the server."""

    dataset_id: str = _Id
    shardset_id: str = _Id
    shard_index: int = Field(ge=0, le=1 << 40)
    format: str = Field(default="parquet", max_length=32)
    overwrite: bool = False


M = TypeVar("M", bound=BaseModel)


def decode(model: type[M], payload: bytes, what: str) -> M:
    """Parse and validate a JSON payload, or raise ``InvalidRequest`` saying what is wrong."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidRequest(f"{what} is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    try:
        return model.model_validate_json(payload or b"{}")
    except ValidationError as exc:
        raise InvalidRequest(f"invalid {what}: {problems(exc)}") from None


def build(model: type[M], what: str, **fields: Any) -> M:
    """Build a payload from keyword arguments, or raise ``InvalidArgument`` saying what is wrong."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise InvalidArgument(f"invalid {what}: {problems(exc)}") from None


def problems(exc: ValidationError) -> str:
    """A validation error in one line: ``field: what is wrong; ...``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: "
        f"{err['msg'].removeprefix('Value error, ')}"
        for err in exc.errors()[:5]
    )


def encode(model: BaseModel) -> bytes:
    """The JSON bytes of a payload."""
    return model.model_dump_json(by_alias=True).encode()


_ITERATION_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
_Seq = Annotated[int, Field(ge=0, le=1 << 62)]
Ranges = list[tuple[_Seq, _Seq]]
"""``[start, stop)`` ranges of sequence numbers or positions (bounded: no huge values)."""


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
