"""``Step``: one plugin of a pipeline with its parameters, and the checks of what it returns.

A step runs its plugin's vectorized form under a time limit and names the plugin in every
error it raises: ``PluginFailed`` (it raised; retried, then by the pipeline's policy),
``PluginTimedOut`` (past the limit: the whole batch by the policy) and ``PluginBroken`` (it
broke its contract, or said its parameters do not fit the data: the iteration fails). The
checks turn a plugin's answer into what the pipeline uses (a filter's mask, a categorizer's
categories, a preprocessor's batch) or say, naming the plugin, how it broke its contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..protocol.errors import InvalidArgument
from .base import BrokenContract, Plugin
from .limits import CallTimedOut, run_with_limit

__all__ = [
    "Call",
    "PluginBroken",
    "PluginFailed",
    "PluginTimedOut",
    "Step",
    "Watch",
    "category_array",
    "filter_mask",
    "output_batch",
]

Watch = Callable[["Step | None"], None]
"""Told the step about to run, then None when it returned (a worker process marks it)."""

Call = tuple[str, dict[str, Any]]
"""A plugin by name with its parameters."""


class PluginFailed(Exception):
    """A plugin call raised (on one of the samples, perhaps): retried, then by the policy."""

    def __init__(self, step: Step, error: BaseException) -> None:
        super().__init__(f"{step.label}: {type(error).__name__}: {error}")
        self.step = step
        self.error = error


class PluginTimedOut(PluginFailed):
    """A plugin call ran past the time limit: the whole batch fails by the policy."""

    def __init__(self, step: Step, error: CallTimedOut) -> None:
        super().__init__(step, error)
        self.seconds = error.seconds


class PluginBroken(PluginFailed):
    """A plugin broke its contract, or said its parameters do not fit the data.

    Not a sample's failure: the iteration fails whatever the policy.
    """

    def __init__(self, step: Step, error: BaseException) -> None:
        super().__init__(step, error)
        self.args = (f"{step.label}: {error}",)


@dataclass
class Step:
    """One plugin with its validated parameters and its instance."""

    plugin: type[Plugin]
    params: dict[str, Any]
    instance: Plugin = field(init=False)

    def __post_init__(self) -> None:
        self.instance = self.plugin.create(self.params)

    @property
    def kind(self) -> str:
        """filter, collater or preprocessor."""
        return self.plugin.kind

    @property
    def name(self) -> str:
        """The plugin's name."""
        return self.plugin.name

    @property
    def label(self) -> str:
        """How errors name it: ``preprocessor 'tokenize'``."""
        return f"{self.kind} {self.name!r}"

    def run(
        self, batch: pa.RecordBatch, timeout: float | None = None, watch: Watch | None = None
    ) -> Any:
        """Run the plugin's vectorized form on a batch; errors name the plugin.

        Args:
            batch: the rows.
            timeout: seconds the call may take (None: no limit; built-ins never get one).
            watch: told this step before the call and None after it.

        Raises:
            PluginTimedOut: past ``timeout`` (the call is abandoned, still running).
            PluginBroken: it raised ``InvalidArgument`` or broke its contract.
            PluginFailed: it raised anything else.
        """
        method = getattr(self.instance, self.plugin._vectorized)
        if watch is not None:
            watch(self)
        try:
            return run_with_limit(
                lambda: method(batch, **self.params), None if self.plugin.builtin() else timeout
            )
        except CallTimedOut as exc:
            raise PluginTimedOut(self, exc) from None
        except (BrokenContract, InvalidArgument) as exc:
            raise PluginBroken(self, exc) from exc
        except (Exception, SystemExit) as exc:  # a plugin calling sys.exit() fails too
            raise PluginFailed(self, exc) from exc
        finally:
            if watch is not None:
                watch(None)

    def __call__(self, batch: pa.RecordBatch) -> Any:
        """Run the plugin on a batch, without a time limit."""
        return self.run(batch)


def filter_mask(step: Step, result: Any, rows: int) -> np.ndarray:
    """A filter's answers as a boolean mask of ``rows`` (nulls drop the row), or broken."""
    if isinstance(result, pa.ChunkedArray):
        result = result.combine_chunks()
    if isinstance(result, pa.Array):
        if not pa.types.is_boolean(result.type):
            raise PluginBroken(
                step, BrokenContract(f"returned {result.type} values, not booleans (bool_)")
            )
        if result.null_count:
            result = result.fill_null(False)
        mask = result.to_numpy(zero_copy_only=False)
    elif isinstance(result, np.ndarray):
        if result.dtype != np.bool_:
            raise PluginBroken(
                step, BrokenContract(f"returned an array of {result.dtype}, not of booleans")
            )
        mask = result
    elif isinstance(result, (list, tuple)):
        odd = next((a for a in result if not isinstance(a, (bool, np.bool_))), None)
        if odd is not None:
            raise PluginBroken(
                step, BrokenContract(f"returned {type(odd).__name__} {odd!r:.40}, not a bool")
            )
        mask = np.array(result, dtype=bool)
    else:
        raise PluginBroken(
            step, BrokenContract(f"returned {type(result).__name__}, not a BooleanArray")
        )
    if mask.shape != (rows,):
        raise PluginBroken(
            step,
            BrokenContract(
                f"returned {len(mask)} answers for a batch of {rows} rows; a filter answers "
                "one boolean per row"
            ),
        )
    return np.asarray(mask, dtype=bool)


def category_array(step: Step, result: Any, rows: int) -> pa.Array:
    """A categorizer's answers as an Arrow array of ``rows`` ints or strings, or broken."""
    if isinstance(result, pa.ChunkedArray):
        result = result.combine_chunks()
    if isinstance(result, np.ndarray):
        result = pa.array(result)
    if not isinstance(result, pa.Array):
        raise PluginBroken(
            step, BrokenContract(f"returned {type(result).__name__}, not an Arrow Array")
        )
    kind = result.type
    if not (
        pa.types.is_integer(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_null(kind)
    ):
        raise PluginBroken(step, BrokenContract(f"returned {kind} values, not integers or strings"))
    if len(result) != rows:
        raise PluginBroken(
            step,
            BrokenContract(
                f"returned {len(result)} categories for a batch of {rows} rows; a categorizer "
                "answers one category per row"
            ),
        )
    return result


def output_batch(step: Step, result: Any, rows: int) -> pa.RecordBatch:
    """A preprocessor's or collater's result as a RecordBatch of the right rows, or broken."""
    if isinstance(result, pa.RecordBatch):
        batch = result
    elif isinstance(result, pa.Table):
        batch = (
            result.combine_chunks().to_batches()[0]
            if result.num_rows
            else pa.RecordBatch.from_pylist([], result.schema)
        )
    elif isinstance(result, dict):
        try:
            batch = pa.RecordBatch.from_pydict(result)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise PluginBroken(
                step, BrokenContract(f"returned a dict that is not a batch of columns: {exc}")
            ) from None
    else:
        raise PluginBroken(
            step, BrokenContract(f"returned {type(result).__name__}, not a RecordBatch")
        )
    if batch.num_rows != rows and not step.plugin.changes_rows:
        raise PluginBroken(
            step,
            BrokenContract(
                f"returned {batch.num_rows} rows for a batch of {rows}; a {step.kind} that "
                "adds or drops rows says so with the class attribute changes_rows = True"
            ),
        )
    return batch
