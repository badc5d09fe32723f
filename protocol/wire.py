"""Typed wire payloads: the envelope (versioned models, decoding), the catalog's bodies, answers.

Iteration payloads (spec, tickets, acks, batch metadata, progress) are in ``iterations``.

Answers: the catalog actions answer their records (``Dataset``, ``Shardset``, ``Shard``,
``SyncResult``, ``ColumnOptions``; a JSON array of them for the listings) and the iteration
actions ``IterationProgress``; the others answer the models of this module (``Deleted``,
``PushedBack``, ``Acked``, ``PluginList``). Both sides parse them with these models.

Every payload has a version field ``v`` so the format can evolve; in requests, unknown
fields, wrong types and oversized values are refused before anything runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidArgument, InvalidRequest
from .records import ColumnOptions

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "Acked",
    "Answer",
    "CreateDatasetBody",
    "CreateShardsetBody",
    "DatasetBody",
    "DeleteDatasetBody",
    "DeleteShardsetBody",
    "Deleted",
    "Empty",
    "GetDatasetBody",
    "LocationBody",
    "PluginDescription",
    "PluginList",
    "PluginParameter",
    "PreviewBody",
    "PushedBack",
    "PutShardCommand",
    "ShardTicket",
    "ShardsetBody",
    "Ranges",
    "WireModel",
    "build",
    "decode",
    "encode",
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


class DeleteDatasetBody(WireModel):
    """``delete_dataset``: ``force`` ends its iterations that have live streams first.

    Without it, a dataset with live iterations is refused (``IterationBusy``).
    """

    dataset_id: str = _Id
    force: bool = False


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


class DeleteShardsetBody(WireModel):
    """``delete_shardset``: ``force`` ends the live iterations reading it first.

    Without it, a shardset that live iterations read is refused (``IterationBusy``).
    """

    dataset_id: str = _Id
    shardset_id: str = _Id
    force: bool = False


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


class Answer(BaseModel):
    """Base of the answers that are not catalog records: versioned, frozen.

    Unknown fields are ignored, so a newer server may add one without breaking older
    clients; an incompatible change bumps ``v``.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    v: Literal[1] = 1


class Deleted(Answer):
    """``delete_dataset``, ``delete_shardset``, ``delete_iteration``: what was deleted."""

    deleted: str


class PushedBack(Answer):
    """``pushback``: how many in-flight samples went back to the queue."""

    pushed_back: int = Field(ge=0)


class Acked(Answer):
    """``ack``: how many samples the acknowledgement completed (not completed before)."""

    completed: int = Field(ge=0)


class PluginParameter(BaseModel):
    """One parameter of a plugin, as ``list_plugins`` shows it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    type: str = ""
    """The annotation as text (empty: none)."""
    default: Any = None
    """The default value (its ``repr`` when it is not JSON); meaningless when required."""
    required: bool = False


class PluginDescription(BaseModel):
    """A filter, collater, preprocessor or categorizer a server offers."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: Literal["filter", "collater", "preprocessor", "categorizer"]
    name: str
    doc: str = ""
    """The first line of its docstring."""
    vectorized: bool = False
    parameters: list[PluginParameter] = Field(default_factory=list)
    depends_on: list[str] = Field(default_factory=list)
    source: str = ""
    """Where it came from: built-in, an entry point or a module file."""


class PluginList(Answer):
    """``list_plugins``: every plugin, and the module files that failed to load."""

    plugins: list[PluginDescription] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)


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


_Seq = Annotated[int, Field(ge=0, le=1 << 62)]
Ranges = list[tuple[_Seq, _Seq]]
"""``[start, stop)`` ranges of sequence numbers or positions (bounded: no huge values)."""
