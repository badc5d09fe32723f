"""What plugins must return, what their errors say, and the policy for whole-batch failures.

No server: pipelines built on a ``Plugins`` of tiny test plugins, run in this process.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lavender_flight.protocol.errors import InvalidArgument, TransformFailed
from lavender_flight.transforms import (
    Collater,
    Filter,
    Pipeline,
    Plugins,
    Preprocessor,
    abandoned_calls,
)
from lavender_flight.transforms.builtins import MAX_EXPRESSION_CHARS, MAX_EXPRESSION_TERMS

BATCH = pa.record_batch(
    {
        "uid": list(range(10)),
        "label": [u % 4 for u in range(10)],
        "text": [f"t{u}" for u in range(10)],
    }
)


def plugins_of(*classes: type, timeout: float | None = None) -> Plugins:
    plugins = Plugins(timeout=timeout)
    for plugin in classes:
        plugins.add(plugin, "test")
    return plugins


# -- a filter answers one boolean per row ---------------------------------------------------


class Stringy(Filter, name="stringy"):
    def filter_batch(self, batch: pa.RecordBatch) -> pa.Array:
        return pa.array(["no"] * batch.num_rows)


class Yes(Filter, name="yes"):
    def filter(self, sample: dict) -> bool:
        return "yes"  # type: ignore[return-value]


class NumpyMask(Filter, name="numpy_mask"):
    def filter_batch(self, batch: pa.RecordBatch) -> np.ndarray:
        return batch.column("uid").to_numpy() % 2 == 0


class ListMask(Filter, name="list_mask"):
    def filter_batch(self, batch: pa.RecordBatch) -> list[bool]:
        return [u < 3 for u in batch.column("uid").to_pylist()]


@pytest.mark.parametrize("skip", [False, True], ids=["strict", "skip_on_failure"])
def test_a_filter_answering_strings_fails_the_iteration(skip: bool) -> None:
    # before: np.asarray(["no", ...], dtype=bool) kept every row
    plugins = plugins_of(Stringy, Yes)
    with pytest.raises(
        TransformFailed, match=r"^filter 'stringy': returned string values, not booleans \(bool_\)$"
    ):
        Pipeline.build(plugins, filters=[("stringy", {})], skip_on_failure=skip).filter(BATCH)
    with pytest.raises(
        TransformFailed,
        match=r"^filter 'yes': filter\(\) returned str 'yes' for a sample, not a bool "
        r"\(True keeps the sample\)$",
    ):
        Pipeline.build(plugins, filters=[("yes", {})], skip_on_failure=skip).filter(BATCH)


def test_numpy_and_list_answers_are_masks() -> None:
    plugins = plugins_of(NumpyMask, ListMask)
    keep, failed = Pipeline.build(plugins, filters=[("numpy_mask", {}), ("list_mask", {})]).filter(
        BATCH
    )
    assert keep.tolist() == [u in (0, 2) for u in range(10)] and not failed.any()


# -- a preprocessor keeps the rows unless it says it changes them -----------------------------


class Halve(Preprocessor, name="halve"):
    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return batch.slice(0, batch.num_rows // 2)


class Explode(Preprocessor, name="explode"):
    """Two rows per sample: it says so."""

    changes_rows = True

    def process(self, batch: pa.RecordBatch) -> pa.Table:
        return pa.concat_tables([pa.Table.from_batches([batch])] * 2)


class Wordy(Preprocessor, name="wordy"):
    def process(self, batch: pa.RecordBatch) -> str:
        return "done"


class Ragged(Collater, name="ragged"):
    def collate(self, samples: list[dict]) -> dict:
        return {"a": [1, 2], "b": [1]}


def test_a_preprocessor_that_changes_the_row_count_must_say_so() -> None:
    plugins = plugins_of(Halve, Explode, Wordy, Ragged)
    for skip in (False, True):  # a broken contract: whatever the policy, no hint to skip
        with pytest.raises(
            TransformFailed,
            match=r"^preprocessor 'halve': returned 5 rows for a batch of 10; a preprocessor "
            r"that adds or drops rows says so with the class attribute changes_rows = True$",
        ):
            Pipeline.build(plugins, preprocessors=[("halve", {})], skip_on_failure=skip).process(
                BATCH
            )
    exploded = Pipeline.build(plugins, preprocessors=[("explode", {})]).process(BATCH)
    assert exploded.result.num_rows == 20 and exploded.failed.tolist() == []
    with pytest.raises(
        TransformFailed, match=r"^preprocessor 'wordy': returned str, not a RecordBatch$"
    ):
        Pipeline.build(plugins, preprocessors=[("wordy", {})]).process(BATCH)
    with pytest.raises(
        TransformFailed, match=r"^collater 'ragged': returned a dict that is not a batch of columns"
    ):
        Pipeline.build(plugins, collater=("ragged", {})).process(BATCH)


# -- every error a plugin causes names it -----------------------------------------------------


class NoInit(Preprocessor, name="no_init"):
    def __init__(self) -> None:
        raise RuntimeError("needs a GPU")

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return batch


class BadHook(Filter, name="bad_hook"):
    @classmethod
    def check_schema(cls, params: dict, schema: pa.Schema) -> pa.Schema:
        return schema.field("nowhere")  # a bug: KeyError

    def filter(self, sample: dict) -> bool:
        return True


class Terse(Filter, name="terse"):
    @classmethod
    def check_params(cls, params: dict) -> None:
        if params["limit"] < 0:
            raise InvalidArgument("limit must not be negative")

    def filter(self, sample: dict, *, limit: int = 0) -> bool:
        return True


class Quitter(Preprocessor, name="quitter"):
    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        raise SystemExit(3)


def test_errors_name_the_plugin() -> None:
    plugins = plugins_of(NoInit, BadHook, Terse, Quitter)
    with pytest.raises(
        TransformFailed,
        match=r"^preprocessor 'no_init' could not be created: RuntimeError: needs a GPU$",
    ):
        Pipeline.build(plugins, preprocessors=[("no_init", {})])
    with pytest.raises(
        TransformFailed,
        match=r"^filter 'bad_hook' could not check its parameters against the columns: KeyError",
    ):
        Pipeline.build(plugins, filters=[("bad_hook", {})], schema=BATCH.schema)
    with pytest.raises(InvalidArgument, match=r"^filter 'terse': limit must not be negative$"):
        Pipeline.build(plugins, filters=[("terse", {"limit": -1})])
    with pytest.raises(
        TransformFailed, match=r"^preprocessor 'quitter' failed on sample uid=0: SystemExit: 3"
    ):
        Pipeline.build(plugins, preprocessors=[("quitter", {})]).process(BATCH)


# -- skip_on_failure with a filter that fails on every batch ----------------------------------


class Hopeless(Filter, name="hopeless"):
    def filter_batch(self, batch: pa.RecordBatch) -> pa.BooleanArray:
        raise KeyError("score")


class Doomed(Preprocessor, name="doomed"):
    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        raise ValueError("never works")


def test_skip_on_failure_skips_every_sample_when_everything_fails() -> None:
    # before: the all-failed batch was run once more, empty, and its error escaped the policy
    plugins = plugins_of(Hopeless, Doomed)
    keep, failed = Pipeline.build(
        plugins, filters=[("hopeless", {})], skip_on_failure=True, max_retry_count=1
    ).filter(BATCH)
    assert not keep.any() and failed.all()
    outcome = Pipeline.build(plugins, preprocessors=[("doomed", {})], skip_on_failure=True).process(
        BATCH
    )
    assert outcome.result is None and outcome.failed.tolist() == list(range(10))
    with pytest.raises(
        TransformFailed,
        match=r"^filter 'hopeless' failed on sample uid=0: KeyError: 'score' \(after 2 tries; "
        r"skip_on_failure=True skips such samples\)$",
    ):
        Pipeline.build(plugins, filters=[("hopeless", {})], max_retry_count=1).filter(BATCH)


# -- the expression filter: parsed, bounded and checked when the iteration is created ---------


def build_expression(expr: str, schema: pa.Schema | None = None) -> Pipeline:
    plugins = Plugins.load(entry_points=False)
    return Pipeline.build(plugins, filters=[("expression", {"expr": expr})], schema=schema)


def test_expression_errors_come_at_creation() -> None:
    with pytest.raises(
        InvalidArgument,
        match=r"^filter 'expression': cannot parse filter expression 'label >= and 3': "
        r"invalid syntax at column 10$",
    ):
        build_expression("label >= and 3")
    with pytest.raises(
        InvalidArgument,
        match=r"^filter 'expression': Call is not supported in a filter expression: use "
        r"comparisons",
    ):
        build_expression("len(text) > 2")
    with pytest.raises(InvalidArgument, match=r"operator Is is not supported"):
        build_expression("label is 3")
    with pytest.raises(InvalidArgument, match=r"the value None is not supported"):
        build_expression("label == None")
    with pytest.raises(InvalidArgument, match=r"the right side of 'in' .* must be a list"):
        build_expression("label in label")
    with pytest.raises(
        InvalidArgument,
        match=r"^filter 'expression': expression 'nope > 1 or label > 2' names unknown column "
        r"'nope'; columns: uid, label, text$",
    ):
        build_expression("nope > 1 or label > 2", BATCH.schema)
    assert build_expression("label > 2", BATCH.schema).filter(BATCH)[0].sum() == 2


def test_expression_size_is_bounded() -> None:
    # before: 20,000 terms were accepted and cost 23.6 s of server CPU over an iteration
    huge = " or ".join(f"uid == {i}" for i in range(6700))  # 20,100 terms
    started = time.perf_counter()
    with pytest.raises(
        InvalidArgument,
        match=rf"^filter 'expression': filter expression is {len(huge)} characters long; "
        rf"the limit is {MAX_EXPRESSION_CHARS}",
    ):
        build_expression(huge)
    short_but_many = "+".join(["uid"] * (MAX_EXPRESSION_TERMS + 1)) + " > 0"
    assert len(short_but_many) < MAX_EXPRESSION_CHARS
    with pytest.raises(
        InvalidArgument,
        match=rf"filter expression has more than {MAX_EXPRESSION_TERMS} terms \(column names, "
        r"values and operations\)",
    ):
        build_expression(short_but_many)
    assert time.perf_counter() - started < 1.0
    ids = list(range(1500))  # a long in-list is one term
    assert build_expression(f"uid in {ids}").filter(BATCH)[0].all()


@pytest.mark.parametrize("skip", [False, True], ids=["strict", "skip_on_failure"])
def test_an_expression_naming_no_column_fails_without_the_skip_hint(skip: bool) -> None:
    # without the schema check (a caller passing no schema) it fails on the first batch: every
    # sample would fail, so skip_on_failure neither skips it nor is suggested
    pipeline = Pipeline.build(
        Plugins.load(entry_points=False),
        filters=[("expression", {"expr": "nope > 1"})],
        skip_on_failure=skip,
    )
    with pytest.raises(TransformFailed) as raised:
        pipeline.filter(BATCH)
    assert str(raised.value) == (
        "filter 'expression': expression names unknown column 'nope'; columns: uid, label, text"
    )


def test_builtins_check_their_columns() -> None:
    plugins = Plugins.load(entry_points=False)
    schema = BATCH.schema
    with pytest.raises(
        InvalidArgument,
        match=r"^filter 'range': range needs a numeric column, 'text' is string; use "
        r"'expression'",
    ):
        Pipeline.build(plugins, filters=[("range", {"column": "text", "min": 1})], schema=schema)
    with pytest.raises(InvalidArgument, match=r"^filter 'sample': sample names unknown column"):
        Pipeline.build(plugins, filters=[("sample", {"column": "id"})], schema=schema)
    with pytest.raises(InvalidArgument, match=r"^filter 'sample': sample rate must be within"):
        Pipeline.build(plugins, filters=[("sample", {"rate": 2.0})])
    with pytest.raises(
        InvalidArgument,
        match=r"^preprocessor 'byte_tokenize': byte_tokenize needs a string column, 'label' is "
        r"int64$",
    ):
        Pipeline.build(
            plugins, preprocessors=[("byte_tokenize", {"column": "label"})], schema=schema
        )
    # byte_tokenize says what it returns: the next step is checked against its output
    twice = [("byte_tokenize", {}), ("byte_tokenize", {"output": "input_ids"})]
    with pytest.raises(InvalidArgument, match=r"output 'input_ids' is already a column"):
        Pipeline.build(plugins, preprocessors=twice, schema=schema)


# -- the time limit in the server process ----------------------------------------------------


class Sleepy(Preprocessor, name="sleepy"):
    def process(self, batch: pa.RecordBatch, *, seconds: float = 3.0) -> pa.RecordBatch:
        if 4 in batch.column("uid").to_pylist():
            time.sleep(seconds)
        return batch


class SleepyFilter(Filter, name="sleepy_filter"):
    def filter_batch(self, batch: pa.RecordBatch, *, seconds: float = 3.0) -> pa.BooleanArray:
        time.sleep(seconds)
        return pc.greater(batch.column("uid"), -1)


def test_a_call_past_the_time_limit_fails_its_batch_and_frees_the_caller() -> None:
    plugins = plugins_of(Sleepy, SleepyFilter, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(
        TransformFailed,
        match=r"^preprocessor 'sleepy' did not finish a batch of 10 samples from uid=0 within "
        r"the plugin time limit of 0.3 s \(--plugin-timeout\); the call was abandoned but may "
        r"still run in the server process \(run plugins that can hang with --workers\); "
        r"skip_on_failure=True skips such batches$",
    ):
        Pipeline.build(plugins, preprocessors=[("sleepy", {})], max_retry_count=3).process(BATCH)
    assert time.monotonic() - started < 1.5  # no retry, no sample-by-sample search
    skipping = Pipeline.build(plugins, preprocessors=[("sleepy", {})], skip_on_failure=True)
    lost = skipping.process(BATCH)
    assert lost.result is None and lost.failed.tolist() == list(range(10))
    assert skipping.process(BATCH.slice(5)).result.num_rows == 5  # the next batch goes on
    keep, failed = Pipeline.build(
        plugins, filters=[("sleepy_filter", {})], skip_on_failure=True
    ).filter(BATCH)
    assert not keep.any() and failed.all()
    assert time.monotonic() - started < 3.0
    assert abandoned_calls() >= 1  # they still sleep, on helper threads
    deadline = time.monotonic() + 10
    while abandoned_calls() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert abandoned_calls() == 0  # ended, their threads back with the helpers


def test_builtins_run_on_the_callers_thread() -> None:
    seen: list[str] = []

    class WhichThread(Filter, name="which_thread"):
        def filter(self, sample: dict) -> bool:
            seen.append(threading.current_thread().name)
            return True

    plugins = plugins_of(WhichThread, timeout=5.0)
    plugins.add(Plugins.load(entry_points=False).filters.get("range"), "builtin")
    assert plugins.filters.get("range").builtin() and not WhichThread.builtin()
    Pipeline.build(plugins, filters=[("which_thread", {})]).filter(BATCH.slice(0, 1))
    assert seen == ["lavender-plugin"]  # a user plugin: on a helper thread, under the limit
    assert Pipeline.build(Plugins(timeout=None), filters=[]).timeout is None


# -- byte_tokenize: Arrow compute, same ids as the bytes say ----------------------------------


def reference_tokens(texts: list[str | None], length: int, offset: int, pad: int) -> list:
    ids, masks = [], []
    for text in texts:
        data = (text or "").encode()[:length]
        ids.append([b + offset for b in data] + [pad] * (length - len(data)))
        masks.append([1] * len(data) + [0] * (length - len(data)))
    return [ids, masks]


@pytest.mark.parametrize("large", [False, True], ids=["string", "large_string"])
def test_byte_tokenize_matches_the_bytes(large: bool) -> None:
    texts = ["héllo wörld", "", None, "€" * 10, "plain ascii text that is long", "a"]
    column = pa.array(texts, pa.large_string() if large else pa.string())
    batch = pa.record_batch({"uid": list(range(len(texts))), "text": column})
    plugins = Plugins.load(entry_points=False)
    params = {"max_length": 7, "offset": 5, "pad_id": 1}
    pipeline = Pipeline.build(plugins, preprocessors=[("byte_tokenize", params)])
    for part, rows in ((batch, texts), (batch.slice(2, 3), texts[2:5])):  # a slice too
        out = pipeline.process(part).result
        assert out.schema.field("input_ids").type == pa.list_(pa.int32(), 7)
        assert out.schema.field("input_ids_mask").type == pa.list_(pa.int8(), 7)
        got = [out.column("input_ids").to_pylist(), out.column("input_ids_mask").to_pylist()]
        assert got == reference_tokens(rows, 7, 5, 1)
        assert out.column("text").to_pylist() == rows
