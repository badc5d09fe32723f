"""``Pipeline``: an iteration's filters, collater and preprocessors, run with its failure policy.

Filters decide which samples stay; the collater makes a batch of the staying samples; the
preprocessors then transform that batch, in the order their ``depends_on`` requires. A
step that raises is retried ``max_retry_count`` times; then the failing samples are found
by running them one at a time, and either dropped and counted as failed
(``skip_on_failure``) or reported as ``TransformFailed`` naming the plugin and the sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from ..protocol.errors import InvalidArgument, TransformFailed
from .base import Plugin
from .registry import Plugins

__all__ = ["Outcome", "Pipeline", "PluginFailed", "Step", "from_spec", "pipeline_spec"]

Call = tuple[str, dict[str, Any]]
"""A plugin by name with its parameters."""

R = TypeVar("R")


class PluginFailed(Exception):
    """A step raised; carries which plugin it was."""

    def __init__(self, step: Step, error: BaseException) -> None:
        super().__init__(f"{step.kind} {step.name!r}: {type(error).__name__}: {error}")
        self.step = step
        self.error = error


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

    def __call__(self, batch: pa.RecordBatch) -> Any:
        """Run the plugin's vectorized form on a batch."""
        method = getattr(self.instance, self.plugin._vectorized)
        try:
            return method(batch, **self.params)
        except Exception as exc:
            raise PluginFailed(self, exc) from exc


@dataclass
class Outcome:
    """What a step under the failure policy produced, and which input rows failed."""

    result: Any
    failed: np.ndarray


def _order(steps: list[Step]) -> list[Step]:
    """Preprocessors in ``depends_on`` order (stable otherwise); unknown or cyclic is an error."""
    by_name = {s.name: s for s in steps}
    ordered: list[Step] = []
    visiting: set[str] = set()

    def visit(step: Step) -> None:
        if step in ordered:
            return
        if step.name in visiting:
            raise InvalidArgument(
                f"preprocessors depend on each other in a cycle through {step.name!r}"
            )
        visiting.add(step.name)
        for dependency in step.plugin.depends_on:
            if dependency not in by_name:
                raise InvalidArgument(
                    f"preprocessor {step.name!r} depends on {dependency!r}, which the iteration "
                    f"does not list; preprocessors: {', '.join(by_name)}"
                )
            visit(by_name[dependency])
        visiting.discard(step.name)
        ordered.append(step)

    for step in steps:
        visit(step)
    return ordered


@dataclass
class Pipeline:
    """The transforms of one iteration, resolved and validated against the server's plugins."""

    filters: list[Step]
    collater: Step | None
    preprocessors: list[Step]
    max_retry_count: int = 0
    skip_on_failure: bool = False
    uid_column: str = "uid"

    @classmethod
    def build(
        cls,
        plugins: Plugins,
        filters: Sequence[Call] = (),
        collater: Call | None = None,
        preprocessors: Sequence[Call] = (),
        max_retry_count: int = 0,
        skip_on_failure: bool = False,
        uid_column: str = "uid",
    ) -> Pipeline:
        """Resolve names, validate parameters, order preprocessors; errors name the problem."""

        def step(kind: str, call: Call) -> Step:
            plugin = plugins.registry(kind).get(call[0])
            return Step(plugin, plugin.validate(dict(call[1])))

        return cls(
            filters=[step("filter", c) for c in filters],
            collater=step("collater", collater) if collater is not None else None,
            preprocessors=_order([step("preprocessor", c) for c in preprocessors]),
            max_retry_count=max_retry_count,
            skip_on_failure=skip_on_failure,
            uid_column=uid_column,
        )

    @property
    def identity(self) -> bool:
        """No transform at all: batches go out as read."""
        return not self.filters and self.collater is None and not self.preprocessors

    @property
    def transforms_batches(self) -> bool:
        """Whether batches are collated or preprocessed (the work a worker pool can share)."""
        return self.collater is not None or bool(self.preprocessors)

    # -- the steps -----------------------------------------------------------------------

    def _mask(self, batch: pa.RecordBatch) -> np.ndarray:
        keep = np.ones(batch.num_rows, dtype=bool)
        for step in self.filters:
            result = step(batch)
            mask = np.asarray(
                result.to_numpy(zero_copy_only=False) if hasattr(result, "to_numpy") else result,
                dtype=bool,
            )
            if mask.shape != (batch.num_rows,):
                raise PluginFailed(
                    step, ValueError(f"returned {mask.shape[0]} answers for {batch.num_rows} rows")
                )
            keep &= mask
        return keep

    def _process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.collater is not None:
            batch = _as_batch(self.collater, self.collater(batch))
        for step in self.preprocessors:
            batch = _as_batch(step, step(batch))
        return batch

    # -- under the failure policy --------------------------------------------------------

    def filter(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """``(keep, failed)`` masks over the rows."""
        if not self.filters:
            return np.ones(batch.num_rows, dtype=bool), np.zeros(batch.num_rows, dtype=bool)
        outcome = self._guarded(self._mask, batch)
        failed = np.zeros(batch.num_rows, dtype=bool)
        failed[outcome.failed] = True
        keep = np.zeros(batch.num_rows, dtype=bool)
        keep[~failed] = outcome.result
        return keep, failed

    def process(self, batch: pa.RecordBatch) -> Outcome:
        """The collated, preprocessed batch, and the rows that failed (already left out)."""
        if not self.transforms_batches:
            return Outcome(batch, np.zeros(0, dtype=np.int64))
        return self._guarded(self._process, batch)

    def _guarded(self, run: Callable[[pa.RecordBatch], R], batch: pa.RecordBatch) -> Outcome:
        error: PluginFailed | None = None
        for _ in range(self.max_retry_count + 1):
            try:
                return Outcome(run(batch), np.zeros(0, dtype=np.int64))
            except PluginFailed as exc:
                error = exc
        assert error is not None
        failed = [i for i in range(batch.num_rows) if self._fails(run, batch.slice(i, 1))]
        if not failed:  # only the whole batch fails: none of its samples alone
            failed = list(range(batch.num_rows))
        first = failed[0]
        if not self.skip_on_failure:
            culprit = self._culprit(run, batch.slice(first, 1)) or error
            uid = (
                batch.column(self.uid_column)[first].as_py()
                if self.uid_column in batch.schema.names
                else first
            )
            raise TransformFailed(
                f"{culprit.step.kind} {culprit.step.name!r} failed on sample "
                f"{self.uid_column}={uid!r}: {type(culprit.error).__name__}: {culprit.error} "
                f"(after {self.max_retry_count + 1} tries; skip_on_failure=True skips such samples)"
            )
        survivors = np.ones(batch.num_rows, dtype=bool)
        survivors[failed] = False
        rest = batch.filter(pa.array(survivors))
        try:
            return Outcome(run(rest), np.array(failed, dtype=np.int64))
        except PluginFailed:
            return Outcome(run(batch.slice(0, 0)), np.arange(batch.num_rows, dtype=np.int64))

    def _fails(self, run: Callable[[pa.RecordBatch], Any], row: pa.RecordBatch) -> bool:
        return self._culprit(run, row) is not None

    def _culprit(
        self, run: Callable[[pa.RecordBatch], Any], row: pa.RecordBatch
    ) -> PluginFailed | None:
        error = None
        for _ in range(self.max_retry_count + 1):
            try:
                run(row)
                return None
            except PluginFailed as exc:
                error = exc
        return error


def _as_batch(step: Step, result: Any) -> pa.RecordBatch:
    if isinstance(result, pa.RecordBatch):
        return result
    if isinstance(result, pa.Table):
        return (
            result.combine_chunks().to_batches()[0]
            if result.num_rows
            else pa.RecordBatch.from_pylist([], result.schema)
        )
    if isinstance(result, dict):
        return pa.RecordBatch.from_pydict(result)
    raise PluginFailed(step, TypeError(f"returned {type(result).__name__}, not a RecordBatch"))


def pipeline_spec(
    filters: Sequence[Call],
    collater: Call | None,
    preprocessors: Sequence[Call],
    max_retry_count: int,
    skip_on_failure: bool,
    uid_column: str,
) -> dict[str, Any]:
    """The JSON-able description a worker process rebuilds a ``Pipeline`` from."""
    return {
        "filters": [list(c) for c in filters],
        "collater": list(collater) if collater is not None else None,
        "preprocessors": [list(c) for c in preprocessors],
        "max_retry_count": max_retry_count,
        "skip_on_failure": skip_on_failure,
        "uid_column": uid_column,
    }


def from_spec(plugins: Plugins, spec: dict[str, Any]) -> Pipeline:
    """The ``Pipeline`` a ``pipeline_spec`` describes."""
    return Pipeline.build(
        plugins,
        [(name, params) for name, params in spec["filters"]],
        (spec["collater"][0], spec["collater"][1]) if spec["collater"] else None,
        [(name, params) for name, params in spec["preprocessors"]],
        spec["max_retry_count"],
        spec["skip_on_failure"],
        spec["uid_column"],
    )
