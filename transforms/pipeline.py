"""``Pipeline``: an iteration's filters, collater and preprocessors, run with its failure policy.

Filters decide which samples stay; the collater makes a batch of the staying samples; the
preprocessors then transform that batch, in the order their ``depends_on`` requires. A
step that raises is retried ``max_retry_count`` times; then the failing samples are found
by running them one at a time, and either dropped and counted as failed
(``skip_on_failure``) or reported as ``TransformFailed`` naming the plugin and the sample.

Two failures take the whole batch at once, by the same policy, untried again: a call that
runs past the time limit (``timeout``, the server's ``--plugin-timeout``), and, in the pool
(``flight_server/pool.py``), a worker process that dies. One failure ends the iteration
whatever the policy, with no hint to skip: a plugin that breaks its contract (see
``base``) or raises ``InvalidArgument`` (its parameters do not fit the data).

Every error a plugin causes names its kind and name, at creation as when running. One
plugin call and the checks of what it returns are ``steps``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from ..protocol.errors import InvalidArgument, LavenderError, TransformFailed
from .base import Plugin
from .registry import Plugins
from .steps import (
    Call,
    PluginBroken,
    PluginFailed,
    PluginTimedOut,
    Step,
    Watch,
    category_array,
    filter_mask,
    output_batch,
)

__all__ = [
    "Outcome",
    "Pipeline",
    "PluginBroken",
    "PluginFailed",
    "PluginTimedOut",
    "Step",
    "from_spec",
    "pipeline_spec",
]

log = logging.getLogger(__name__)

NO_ROWS = np.zeros(0, dtype=np.int64)

R = TypeVar("R")


@dataclass
class Outcome:
    """What a step under the failure policy produced, and which input rows failed.

    ``result`` is None when every row failed and there is nothing to show.
    """

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


def _named(plugin: type[Plugin], doing: str, run: Callable[[], R]) -> R:
    """``run()``, its errors naming the plugin: a hook's bug is ``TransformFailed``."""
    label = f"{plugin.kind} {plugin.name!r}"
    try:
        return run()
    except InvalidArgument as exc:
        if str(exc).startswith(label):
            raise
        raise type(exc)(f"{label}: {exc}") from None
    except LavenderError:
        raise
    except Exception as exc:
        raise TransformFailed(f"{label} {doing}: {type(exc).__name__}: {exc}") from exc


@dataclass
class Pipeline:
    """The transforms of one iteration, resolved and validated against the server's plugins."""

    filters: list[Step]
    collater: Step | None
    preprocessors: list[Step]
    max_retry_count: int = 0
    skip_on_failure: bool = False
    uid_column: str = "uid"
    timeout: float | None = None
    """Seconds one plugin call on one batch may take (None: no limit)."""
    watch: Watch | None = field(default=None, repr=False)
    """Told each step before it runs (a worker process marks it for the pool)."""
    categorizer: Step | None = None
    """Says each (kept) sample's category; batches then hold one category each."""

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
        schema: pa.Schema | None = None,
        categorizer: Call | None = None,
    ) -> Pipeline:
        """Resolve names, validate parameters, order preprocessors; errors name the problem.

        Args:
            plugins: the server's plugins (their ``timeout`` is the pipeline's).
            filters: ``(name, params)`` of each filter.
            collater: ``(name, params)`` of the collater, or None.
            preprocessors: ``(name, params)`` of each preprocessor, in any order.
            max_retry_count: tries after the first before the policy applies.
            skip_on_failure: drop failing samples (counted as failed) instead of raising.
            uid_column: the column errors name samples by.
            schema: the rows the iteration reads; given, each plugin's ``check_schema``
                checks its parameters against the columns.
            categorizer: ``(name, params)`` of the categorizer, or None.

        Raises:
            InvalidArgument: an unknown plugin, a wrong parameter, a column that does not
                exist, preprocessors that depend on one not listed.
            TransformFailed: a plugin could not be created or its checks broke.
        """

        def step(kind: str, call: Call) -> Step:
            plugin = plugins.registry(kind).get(call[0])
            params = _named(plugin, "could not check its parameters",
                            lambda: plugin.validate(dict(call[1])))  # fmt: skip
            _named(plugin, "could not check its parameters", lambda: plugin.check_params(params))
            return _named(plugin, "could not be created", lambda: Step(plugin, params))

        pipeline = cls(
            filters=[step("filter", c) for c in filters],
            collater=step("collater", collater) if collater is not None else None,
            preprocessors=_order([step("preprocessor", c) for c in preprocessors]),
            max_retry_count=max_retry_count,
            skip_on_failure=skip_on_failure,
            uid_column=uid_column,
            timeout=plugins.timeout,
            categorizer=step("categorizer", categorizer) if categorizer is not None else None,
        )
        if schema is not None:
            pipeline.check_schema(schema)
        return pipeline

    def check_schema(self, schema: pa.Schema) -> pa.Schema | None:
        """Run each plugin's ``check_schema`` on the columns it will see (while known).

        Returns:
            The schema of the batches the pipeline makes, when every collater and
            preprocessor says what it returns (else None: run it on a sample to know).

        Raises:
            InvalidArgument: a parameter does not fit the columns (naming the plugin).
        """

        def check(step: Step, columns: pa.Schema) -> pa.Schema | None:
            found = _named(
                step.plugin,
                "could not check its parameters against the columns",
                lambda: step.plugin.check_schema(step.params, columns),
            )
            return found if isinstance(found, pa.Schema) else None

        for step in self.filters:
            check(step, schema)
        if self.categorizer is not None:
            check(self.categorizer, schema)
        current: pa.Schema | None = schema
        for step in [self.collater] if self.collater is not None else []:
            current = check(step, schema)
        for step in self.preprocessors:
            if current is None:
                return None  # a step before said nothing of its output
            current = check(step, current)
        return current

    @property
    def steps(self) -> list[Step]:
        """Every step, in the order they run."""
        return [
            *self.filters,
            *([self.categorizer] if self.categorizer else []),
            *([self.collater] if self.collater else []),
            *self.preprocessors,
        ]

    @property
    def only_builtins(self) -> bool:
        """Whether every step is a built-in (ours, bounded: safe in the server process)."""
        return all(step.plugin.builtin() for step in self.steps)

    @property
    def identity(self) -> bool:
        """No transform at all: batches go out as read."""
        return (
            not self.filters
            and self.collater is None
            and not self.preprocessors
            and self.categorizer is None
        )

    @property
    def transforms_batches(self) -> bool:
        """Whether batches are collated or preprocessed (the work a worker pool can share)."""
        return self.collater is not None or bool(self.preprocessors)

    @property
    def rowwise(self) -> bool:
        """Whether the collater and preprocessors all make each row from its own row alone.

        Then several batches' rows may be processed in one call (``Plugin.rowwise``).
        """
        steps = [*([self.collater] if self.collater else []), *self.preprocessors]
        return bool(steps) and all(
            step.plugin.rowwise and not step.plugin.changes_rows for step in steps
        )

    # -- the steps -----------------------------------------------------------------------

    def _run(self, step: Step, batch: pa.RecordBatch) -> Any:
        return step.run(batch, self.timeout, self.watch)

    def _mask(self, batch: pa.RecordBatch) -> np.ndarray:
        keep: np.ndarray | None = None
        for step in self.filters:
            mask = filter_mask(step, self._run(step, batch), batch.num_rows)
            keep = mask if keep is None else keep & mask
        return np.ones(batch.num_rows, dtype=bool) if keep is None else keep

    def _process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.collater is not None:
            batch = output_batch(self.collater, self._run(self.collater, batch), batch.num_rows)
        for step in self.preprocessors:
            batch = output_batch(step, self._run(step, batch), batch.num_rows)
        return batch

    # -- under the failure policy --------------------------------------------------------

    def filter(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """``(keep, failed)`` masks over the rows.

        Raises:
            TransformFailed: without ``skip_on_failure``, a sample (or the batch) failed;
                whatever the policy, a filter broke its contract.
        """
        if not self.filters:
            return np.ones(batch.num_rows, dtype=bool), np.zeros(batch.num_rows, dtype=bool)
        outcome = self._guarded(self._mask, batch, np.zeros(0, dtype=bool))
        failed = np.zeros(batch.num_rows, dtype=bool)
        if not len(outcome.failed):  # the usual case: every row answered
            return outcome.result, failed
        failed[outcome.failed] = True
        keep = np.zeros(batch.num_rows, dtype=bool)
        keep[~failed] = outcome.result
        return keep, failed

    def _categories(self, batch: pa.RecordBatch) -> pa.Array:
        assert self.categorizer is not None
        return category_array(self.categorizer, self._run(self.categorizer, batch), batch.num_rows)

    def categorize(self, batch: pa.RecordBatch) -> tuple[pa.Array, np.ndarray]:
        """``(categories, failed)``: each row's category (null where it failed), failed mask.

        Raises:
            TransformFailed: as ``filter`` does.
        """
        if self.categorizer is None:
            return pa.nulls(batch.num_rows, pa.int64()), np.zeros(batch.num_rows, dtype=bool)
        outcome = self._guarded(self._categories, batch, None)
        failed = np.zeros(batch.num_rows, dtype=bool)
        failed[outcome.failed] = True
        if outcome.result is None:
            return pa.nulls(batch.num_rows, pa.int64()), failed
        values = outcome.result
        if failed.any():  # the survivors' answers, back in their rows
            survivors = np.flatnonzero(~failed)
            spread = np.full(batch.num_rows, -1, dtype=np.int64)
            spread[survivors] = np.arange(len(survivors))
            values = values.take(pa.array(spread, mask=failed))
        return values, failed

    def process(self, batch: pa.RecordBatch) -> Outcome:
        """The collated, preprocessed batch, and the rows that failed (already left out).

        Raises:
            TransformFailed: as ``filter`` does.
        """
        if not self.transforms_batches:
            return Outcome(batch, NO_ROWS)
        return self._guarded(self._process, batch, None)

    def _guarded(
        self, run: Callable[[pa.RecordBatch], R], batch: pa.RecordBatch, nothing: Any
    ) -> Outcome:
        """``run(batch)`` under the policy; ``nothing`` is the result when every row fails."""
        error: PluginFailed | None = None
        try:
            for _ in range(self.max_retry_count + 1):
                try:
                    return Outcome(run(batch), NO_ROWS)
                except PluginTimedOut:
                    raise
                except PluginBroken:
                    raise
                except PluginFailed as exc:
                    error = exc
            assert error is not None
            # which samples fail alone (without skip_on_failure the first one is enough)
            failed: list[int] = []
            culprit: PluginFailed | None = None
            for row in range(batch.num_rows):
                found = self._culprit(run, batch.slice(row, 1))
                if found is not None:
                    failed.append(row)
                    culprit = culprit or found
                    if not self.skip_on_failure:
                        break
            alone = bool(failed)
            if not alone:
                failed = list(range(batch.num_rows))
            if not self.skip_on_failure:
                raise TransformFailed(self._failure_line(culprit or error, batch, failed[0], alone))
            survivors = np.ones(batch.num_rows, dtype=bool)
            survivors[failed] = False
            if not survivors.any():
                return Outcome(nothing, np.arange(batch.num_rows, dtype=np.int64))
            try:
                return Outcome(run(batch.filter(pa.array(survivors))), np.array(failed, np.int64))
            except (PluginBroken, PluginTimedOut):
                raise
            except PluginFailed:  # the rest fails together: every sample of the batch fails
                return Outcome(nothing, np.arange(batch.num_rows, dtype=np.int64))
        except PluginBroken as exc:
            raise TransformFailed(str(exc)) from None
        except PluginTimedOut as exc:
            return self.lost(batch, self._timed_out_line(exc, batch), nothing)

    def lost(self, batch: pa.RecordBatch, why: str, nothing: Any = None) -> Outcome:
        """The whole batch failed at once (a time limit, a dead worker): by the policy.

        Args:
            batch: the batch.
            why: the failure, one line naming the plugin (the sample hint is added here).
            nothing: the result to answer when skipping (None for a processed batch).

        Raises:
            TransformFailed: without ``skip_on_failure``.
        """
        if not self.skip_on_failure:
            raise TransformFailed(f"{why}; skip_on_failure=True skips such batches")
        log.warning("skipping %d samples: %s", batch.num_rows, why)
        return Outcome(nothing, np.arange(batch.num_rows, dtype=np.int64))

    def describe(self, batch: pa.RecordBatch) -> str:
        """``a batch of 16 samples from uid=3``: how errors name a batch."""
        if not batch.num_rows:
            return "an empty batch"
        return f"a batch of {batch.num_rows} samples from {self.uid_column}={self._uid(batch, 0)!r}"

    def _uid(self, batch: pa.RecordBatch, row: int) -> Any:
        if self.uid_column in batch.schema.names:
            return batch.column(self.uid_column)[row].as_py()
        return row

    def _failure_line(
        self, culprit: PluginFailed, batch: pa.RecordBatch, row: int, alone: bool
    ) -> str:
        where = (
            f"sample {self.uid_column}={self._uid(batch, row)!r}"
            if alone
            else f"{self.describe(batch)} (no sample fails alone)"
        )
        return (
            f"{culprit.step.label} failed on {where}: {type(culprit.error).__name__}: "
            f"{culprit.error} (after {self.max_retry_count + 1} tries; skip_on_failure=True "
            f"skips such {'samples' if alone else 'batches'})"
        )

    def _timed_out_line(self, exc: PluginTimedOut, batch: pa.RecordBatch) -> str:
        return (
            f"{exc.step.label} did not finish {self.describe(batch)} within the plugin time "
            f"limit of {exc.seconds:g} s (--plugin-timeout); the call was abandoned but may "
            "still run in the server process (run plugins that can hang with --workers)"
        )

    def _culprit(
        self, run: Callable[[pa.RecordBatch], Any], row: pa.RecordBatch
    ) -> PluginFailed | None:
        error = None
        for _ in range(self.max_retry_count + 1):
            try:
                run(row)
                return None
            except (PluginBroken, PluginTimedOut):
                raise
            except PluginFailed as exc:
                error = exc
        return error


def pipeline_spec(
    filters: Sequence[Call],
    collater: Call | None,
    preprocessors: Sequence[Call],
    max_retry_count: int,
    skip_on_failure: bool,
    uid_column: str,
    categorizer: Call | None = None,
) -> dict[str, Any]:
    """The JSON-able description a worker process rebuilds a ``Pipeline`` from."""
    found: dict[str, Any] = {
        "filters": [list(c) for c in filters],
        "collater": list(collater) if collater is not None else None,
        "preprocessors": [list(c) for c in preprocessors],
        "max_retry_count": max_retry_count,
        "skip_on_failure": skip_on_failure,
        "uid_column": uid_column,
    }
    if categorizer is not None:
        found["categorizer"] = list(categorizer)
    return found


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
        categorizer=(spec["categorizer"][0], spec["categorizer"][1])
        if spec.get("categorizer")
        else None,
    )
