"""Plugin base classes: ``Filter``, ``Preprocessor``, ``Collater``, ``Categorizer``.

A subclass names itself with ``name=`` (``class UidModFilter(Filter, name="uid_mod")``) and
overrides one method of its kind: the vectorized form over a ``pyarrow.RecordBatch``, or
the per-sample form (the seed's API, applied row by row). Parameters are keyword-only
arguments with defaults, after ``*``; they are validated when an iteration is created and
are also set as attributes of the instance (the seed's examples read ``self.mod``).

Two optional hooks check more when the iteration is created: ``check_params`` (the
parameters alone, e.g. parse an expression) and ``check_schema`` (the parameters against
the columns and types of the rows the plugin will see). Either raises ``InvalidArgument``.
A plugin that raises ``InvalidArgument`` while running says its parameters do not fit the
data: the iteration fails whatever ``skip_on_failure`` says (every sample would fail).

What a plugin returns is checked: a filter answers one boolean per row; a preprocessor or
collater returns a batch (a ``RecordBatch``, a ``Table`` or a dict of columns) of as many
rows as it was given, unless it declares ``changes_rows = True``.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import ConfigDict, ValidationError, create_model

from ..protocol.errors import InvalidArgument

__all__ = [
    "BrokenContract",
    "Categorizer",
    "Collater",
    "Filter",
    "Parameter",
    "Plugin",
    "Preprocessor",
]

BUILTINS_MODULE = __name__.rsplit(".", 1)[0] + ".builtins"
"""The module of the built-in plugins (our own code, bounded by its input)."""


class BrokenContract(TypeError):
    """A plugin returned what its kind does not allow (a filter answering strings...).

    Not a failure of a sample: the iteration fails, whatever ``skip_on_failure`` says.
    """


@dataclass(frozen=True)
class Parameter:
    """One parameter of a plugin."""

    name: str
    annotation: str
    default: Any
    required: bool


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Plugin:
    """What every plugin shares: a kind, a name, its parameters."""

    kind: ClassVar[str] = "plugin"
    name: ClassVar[str] = ""
    depends_on: ClassVar[tuple[str, ...]] = ()
    changes_rows: ClassVar[bool] = False
    """A preprocessor or collater that returns more or fewer rows than it is given says so."""
    rowwise: ClassVar[bool] = False
    """A preprocessor or collater whose output row ``i`` depends on input row ``i`` alone
    (and whose output does not depend on where a batch starts or ends) says so: the server
    may then give it the rows of several batches in one call and cut the batches out of
    the result (a time limit then takes all of those rows at once). A server with worker
    processes does so for built-in pipelines only: a user plugin's batches go to several
    workers at once, where one call would keep one busy."""
    _vectorized: ClassVar[str] = ""
    _per_sample: ClassVar[str] = ""

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
        elif "name" not in cls.__dict__:
            cls.name = _snake(cls.__name__.removesuffix(cls.kind.capitalize()) or cls.__name__)
        cls.depends_on = tuple(cls.depends_on)

    @classmethod
    def is_abstract(cls) -> bool:
        """A base class that overrides neither form (not a usable plugin)."""
        return cls.method() is None

    @classmethod
    def method(cls) -> Callable[..., Any] | None:
        """The method this plugin overrides: its vectorized or its per-sample form."""
        for base in cls.__mro__:
            if base in (Filter, Preprocessor, Collater, Categorizer, Plugin, object):
                break
            for attr in (cls._vectorized, cls._per_sample):
                if attr in base.__dict__:
                    return typing.cast(Callable[..., Any], getattr(cls, attr))
        return None

    @classmethod
    def vectorized(cls) -> bool:
        """Whether the plugin works on whole Arrow batches."""
        method = cls.method()
        return method is not None and method.__name__ == cls._vectorized

    @classmethod
    def builtin(cls) -> bool:
        """Whether the code that runs is a built-in's (ours, bounded: no time limit thread)."""
        method = cls.method()
        return method is not None and method.__module__ == BUILTINS_MODULE

    @classmethod
    def parameters(cls) -> list[Parameter]:
        """The keyword-only parameters of the overridden method."""
        method = cls.method()
        if method is None:
            return []
        found = []
        for p in inspect.signature(method).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            annotation = p.annotation
            text = (
                annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
            )
            found.append(
                Parameter(
                    name=p.name,
                    annotation="" if annotation is inspect.Parameter.empty else str(text),
                    default=None if p.default is inspect.Parameter.empty else p.default,
                    required=p.default is inspect.Parameter.empty,
                )
            )
        return found

    @classmethod
    def doc(cls) -> str:
        """The first line of the class docstring."""
        return (inspect.getdoc(cls) or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def validate(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters with defaults filled in, checked against the signature's types."""
        method = cls.method()
        assert method is not None
        known = {p.name: p for p in cls.parameters()}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise InvalidArgument(
                f"{cls.kind} {cls.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"parameters: {', '.join(known) or 'none'}"
            )
        try:
            hints = typing.get_type_hints(method)
        except (NameError, TypeError):
            hints = {}
        fields: dict[str, Any] = {
            name: (hints.get(name, Any), ... if p.required else p.default)
            for name, p in known.items()
        }
        # any annotation may be a plain class (checked by isinstance): no pydantic schema error
        model = create_model(
            f"{cls.__name__}Params",
            __config__=ConfigDict(arbitrary_types_allowed=True),
            **fields,
        )
        try:
            checked = model(**params)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise InvalidArgument(f"{cls.kind} {cls.name!r}: {problems}") from None
        return {name: getattr(checked, name) for name in known}

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Check the validated parameters further (the default checks nothing).

        Called once when an iteration is created, with every parameter filled in.

        Raises:
            InvalidArgument: a parameter is wrong; say which and how to fix it.
        """

    @classmethod
    def check_schema(cls, params: dict[str, Any], schema: pa.Schema) -> pa.Schema | None:
        """Check the parameters against the columns of the rows this plugin will see.

        Called when an iteration is created, if the columns are known: a filter and the
        collater get the rows read; a preprocessor the output of the step before it, when
        that step said what it is. The default checks nothing.

        Args:
            params: the validated parameters.
            schema: the names and types of the columns of the rows.

        Returns:
            The schema of what the plugin returns, when known (so the next step is checked
            too), else None. A filter returns ``schema``: it keeps the columns.

        Raises:
            InvalidArgument: a parameter does not fit the columns (name the columns there
                are).
        """
        return schema if cls.kind in ("filter", "categorizer") else None

    @classmethod
    def create(cls, params: dict[str, Any]) -> Plugin:
        """An instance with its parameters also set as attributes."""
        instance = cls()
        for key, value in params.items():
            setattr(instance, key, value)
        return instance


class Filter(Plugin):
    """Keeps the samples for which it answers True.

    Override ``filter_batch(batch, **params) -> BooleanArray`` (vectorized, preferred) or
    ``filter(sample, **params) -> bool`` (per sample).
    """

    kind = "filter"
    _vectorized = "filter_batch"
    _per_sample = "filter"

    def filter_batch(self, batch: pa.RecordBatch, **params: Any) -> pa.BooleanArray:
        """A mask over the batch's rows: True keeps the row."""
        answers = [self.filter(row, **params) for row in batch.to_pylist()]
        for answer in answers:
            if not isinstance(answer, (bool, np.bool_)):
                raise BrokenContract(
                    f"filter() returned {type(answer).__name__} {answer!r:.40} for a sample, "
                    "not a bool (True keeps the sample)"
                )
        return pa.array(answers, pa.bool_())

    def filter(self, sample: dict[str, Any], **params: Any) -> bool:
        """Whether to keep one sample."""
        raise NotImplementedError


class Preprocessor(Plugin):
    """Transforms batches before they reach the client (may add, replace or drop columns).

    Override ``process(batch, **params) -> RecordBatch`` (vectorized, preferred) or
    ``process_sample(sample, **params) -> dict`` (per sample). ``depends_on`` names
    preprocessors that must run before this one. A batch keeps its number of rows unless
    the class says ``changes_rows = True``.
    """

    kind = "preprocessor"
    _vectorized = "process"
    _per_sample = "process_sample"

    def process(self, batch: pa.RecordBatch, **params: Any) -> pa.RecordBatch:
        """The transformed batch."""
        samples = [self.process_sample(row, **params) for row in batch.to_pylist()]
        for sample in samples:
            if not isinstance(sample, dict):
                raise BrokenContract(
                    f"process_sample() returned {type(sample).__name__}, not a dict of the "
                    "sample's columns"
                )
        return pa.RecordBatch.from_pylist(samples)

    def process_sample(self, sample: dict[str, Any], **params: Any) -> dict[str, Any]:
        """One transformed sample."""
        raise NotImplementedError


class Collater(Plugin):
    """Makes the batch the client receives out of the batch's samples.

    Override ``collate_batch(batch, **params) -> RecordBatch`` (vectorized) or
    ``collate(samples, **params) -> dict`` (the seed's form: a dict of columns). A batch
    keeps its number of rows unless the class says ``changes_rows = True``.
    """

    kind = "collater"
    _vectorized = "collate_batch"
    _per_sample = "collate"

    def collate_batch(self, batch: pa.RecordBatch, **params: Any) -> pa.RecordBatch:
        """The batch to send."""
        columns = self.collate(batch.to_pylist(), **params)
        if not isinstance(columns, dict):
            raise BrokenContract(f"collate() returned {type(columns).__name__}, not a dict")
        try:
            return pa.RecordBatch.from_pydict(
                {
                    k: v.tolist() if isinstance(v, np.ndarray) and v.ndim > 1 else v
                    for k, v in columns.items()
                }
            )
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise BrokenContract(f"returned a dict that is not a batch of columns: {exc}") from None

    def collate(self, samples: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
        """The batch's columns out of its samples."""
        raise NotImplementedError


class Categorizer(Plugin):
    """Says each sample's category: every batch then holds samples of one category.

    Override ``categorize_batch(batch, **params) -> Array`` (vectorized, preferred: one
    value per row, ints or strings, null for "no category", a category of its own) or
    ``categorize(sample, **params) -> int | str | None`` (per sample). Categories are
    values, not positions: the same value is the same category in every batch.
    """

    kind = "categorizer"
    _vectorized = "categorize_batch"
    _per_sample = "categorize"

    def categorize_batch(self, batch: pa.RecordBatch, **params: Any) -> pa.Array:
        """The category of each row."""
        answers = [self.categorize(row, **params) for row in batch.to_pylist()]
        for answer in answers:
            if answer is not None and not isinstance(answer, (bool, int, str, np.integer)):
                raise BrokenContract(
                    f"categorize() returned {type(answer).__name__} {answer!r:.40} for a "
                    "sample, not an int or a str"
                )
        try:
            return pa.array(answers)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise BrokenContract(f"categorize() answers are not of one type: {exc}") from None

    def categorize(self, sample: dict[str, Any], **params: Any) -> int | str | None:
        """The category of one sample."""
        raise NotImplementedError
