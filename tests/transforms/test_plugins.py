"""Plugins without a server: registration, sources, parameters, built-ins, the failure policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lavender_flight.protocol.errors import AlreadyExists, InvalidArgument, TransformFailed
from lavender_flight.transforms import Collater, Filter, Pipeline, Plugins, Preprocessor

SEED_FILTER = """
from lavender_flight.transforms import Filter

class UidModFilter(Filter, name="uid_mod"):
    def filter(self, sample: dict, *, mod: int = 2) -> bool:
        return sample["uid"] % self.mod == 0
"""

BATCH = pa.record_batch(
    {
        "uid": list(range(10)),
        "label": [u % 4 for u in range(10)],
        "text": [f"t{u}" for u in range(10)],
    }
)


def modules(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "modules"
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.py").write_text(text)
    return folder


def test_seed_filter_from_a_modules_folder(tmp_path: Path) -> None:
    plugins = Plugins.load(modules(tmp_path, custom_filter=SEED_FILTER))
    plugin = plugins.filters.get("uid_mod")
    assert not plugin.vectorized()
    assert [(p.name, p.annotation, p.default) for p in plugin.parameters()] == [("mod", "int", 2)]
    pipeline = Pipeline.build(plugins, filters=[("uid_mod", {"mod": 3})])
    keep, failed = pipeline.filter(BATCH)
    assert keep.tolist() == [u % 3 == 0 for u in range(10)] and not failed.any()


def test_builtins_are_listed_with_parameters() -> None:
    infos = {(i.kind, i.name): i for i in Plugins.load().describe()}
    assert set(infos) >= {
        ("filter", "range"),
        ("filter", "sample"),
        ("filter", "expression"),
        ("collater", "arrow"),
        ("preprocessor", "byte_tokenize"),
    }
    assert infos[("filter", "range")].doc.startswith("Keeps rows whose")
    params = {p["name"]: p for p in infos[("filter", "range")].parameters}
    assert params["column"]["required"] and params["min"]["default"] is None
    assert infos[("preprocessor", "byte_tokenize")].vectorized


def test_broken_module_is_reported_not_fatal(tmp_path: Path) -> None:
    folder = modules(
        tmp_path, good=SEED_FILTER, broken="import nowhere_to_be_found\n", syntax="def (:\n"
    )
    plugins = Plugins.load(folder)
    assert plugins.filters.get("uid_mod")
    assert len(plugins.problems) == 2
    assert any(
        str(folder / "broken.py") in p and "ModuleNotFoundError" in p for p in plugins.problems
    )
    assert any(str(folder / "syntax.py") in p and "SyntaxError" in p for p in plugins.problems)
    with pytest.raises(InvalidArgument, match="does not exist"):
        Plugins.load(tmp_path / "nope")


def test_duplicate_and_unknown_names(tmp_path: Path) -> None:
    twin = SEED_FILTER.replace("UidModFilter", "Other")
    plugins = Plugins.load(modules(tmp_path, a=SEED_FILTER, b=twin))
    # the second file is refused and reported; the server keeps the first
    assert plugins.filters.source("uid_mod").endswith("a.py")
    (problem,) = plugins.problems
    assert problem.startswith(str(tmp_path / "modules" / "b.py"))
    assert "AlreadyExists: filter 'uid_mod' is defined twice: in " in problem

    class Range(Filter, name="range"):
        def filter(self, sample: dict) -> bool:
            return True

    with pytest.raises(AlreadyExists, match="filter 'range' is defined twice"):
        plugins.add(Range, "test")
    with pytest.raises(
        InvalidArgument, match=r"no filter named 'uid_mood'; filters: expression, range, sample"
    ):
        Pipeline.build(Plugins.load(), filters=[("uid_mood", {})])


def test_parameters_are_validated_before_running(tmp_path: Path) -> None:
    plugins = Plugins.load(modules(tmp_path, f=SEED_FILTER))
    with pytest.raises(
        InvalidArgument, match=r"filter 'uid_mod' has no parameter 'modd'; parameters: mod"
    ):
        Pipeline.build(plugins, filters=[("uid_mod", {"modd": 3})])
    with pytest.raises(
        InvalidArgument, match=r"filter 'uid_mod': mod: Input should be a valid integer"
    ):
        Pipeline.build(plugins, filters=[("uid_mod", {"mod": "three"})])
    with pytest.raises(InvalidArgument, match=r"filter 'range': column: Field required"):
        Pipeline.build(plugins, filters=[("range", {})])


def test_depends_on_orders_preprocessors() -> None:
    class First(Preprocessor, name="first"):
        def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
            return batch.append_column("a", pa.array([1] * batch.num_rows))

    class Second(Preprocessor, name="second"):
        depends_on = ("first",)

        def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
            return batch.append_column("b", pa.compute.add(batch.column("a"), 1))

    plugins = Plugins()
    plugins.add(First, "test")
    plugins.add(Second, "test")
    pipeline = Pipeline.build(plugins, preprocessors=[("second", {}), ("first", {})])
    assert [s.name for s in pipeline.preprocessors] == ["first", "second"]
    assert pipeline.process(BATCH).result.column("b").to_pylist() == [2] * 10
    with pytest.raises(
        InvalidArgument, match="depends on 'first', which the iteration does not list"
    ):
        Pipeline.build(plugins, preprocessors=[("second", {})])


def test_per_sample_forms_and_collater() -> None:
    class Upper(Preprocessor, name="upper"):
        def process_sample(self, sample: dict, *, suffix: str = "") -> dict:
            return {**sample, "text": sample["text"].upper() + suffix}

    class Stack(Collater, name="stack"):
        def collate(self, samples: list[dict]) -> dict:
            return {"uid": [s["uid"] for s in samples], "n": [len(samples)] * len(samples)}

    plugins = Plugins()
    plugins.add(Upper, "test")
    plugins.add(Stack, "test")
    out = Pipeline.build(plugins, preprocessors=[("upper", {"suffix": "!"})]).process(
        BATCH.slice(0, 2)
    )
    assert out.result.column("text").to_pylist() == ["T0!", "T1!"]
    collated = Pipeline.build(plugins, collater=("stack", {})).process(BATCH.slice(0, 3))
    assert collated.result.to_pydict() == {"uid": [0, 1, 2], "n": [3, 3, 3]}


class Picky(Preprocessor, name="picky"):
    """Fails on samples whose uid is 3 or 7."""

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        bad = set(batch.column("uid").to_pylist()) & {3, 7}
        if bad:
            raise ValueError(f"cannot take uid {min(bad)}")
        return batch


def test_failure_policy_skip_and_error() -> None:
    plugins = Plugins()
    plugins.add(Picky, "test")
    skipping = Pipeline.build(plugins, preprocessors=[("picky", {})], skip_on_failure=True)
    outcome = skipping.process(BATCH)
    assert outcome.failed.tolist() == [3, 7]
    assert outcome.result.column("uid").to_pylist() == [0, 1, 2, 4, 5, 6, 8, 9]
    strict = Pipeline.build(plugins, preprocessors=[("picky", {})], max_retry_count=2)
    with pytest.raises(
        TransformFailed,
        match=r"preprocessor 'picky' failed on sample uid=3: ValueError: cannot take uid 3 "
        r"\(after 3 tries",
    ):
        strict.process(BATCH)


def test_retries_cure_transient_failures() -> None:
    calls: list[int] = []

    class Flaky(Preprocessor, name="flaky"):
        def process(self, batch: pa.RecordBatch, *, fail_times: int = 2) -> pa.RecordBatch:
            calls.append(1)
            if len(calls) <= fail_times:
                raise ConnectionError("try again")
            return batch

    plugins = Plugins()
    plugins.add(Flaky, "test")
    ok = Pipeline.build(plugins, preprocessors=[("flaky", {})], max_retry_count=2).process(BATCH)
    assert ok.result.num_rows == 10 and ok.failed.tolist() == [] and len(calls) == 3


def test_builtin_filters() -> None:
    plugins = Plugins.load()

    def keep(name: str, **params: object) -> list[int]:
        mask, _ = Pipeline.build(plugins, filters=[(name, params)]).filter(BATCH)
        return [u for u, k in zip(range(10), mask.tolist(), strict=True) if k]

    assert keep("range", column="label", min=1, max=2) == [1, 2, 5, 6, 9]
    assert keep("expression", expr="label >= 2 and uid % 3 == 0") == [3, 6]
    assert keep("expression", expr="text in ['t1', 't2'] or not uid < 9") == [1, 2, 9]
    sampled = keep("sample", rate=0.5, seed=1)
    assert sampled == keep("sample", rate=0.5, seed=1) and sampled != keep(
        "sample", rate=0.5, seed=2
    )
    big = pa.record_batch({"uid": np.arange(100_000)})
    share = Pipeline.build(plugins, filters=[("sample", {"rate": 0.25})]).filter(big)[0].mean()
    assert 0.24 < share < 0.26
    with pytest.raises(TransformFailed, match="unknown column 'nope'"):
        Pipeline.build(plugins, filters=[("expression", {"expr": "nope > 1"})]).filter(BATCH)
    with pytest.raises(InvalidArgument, match="unknown column 'nope'"):
        Pipeline.build(plugins, filters=[("expression", {"expr": "nope > 1"})], schema=BATCH.schema)


def test_byte_tokenizer() -> None:
    out = Pipeline.build(
        Plugins.load(), preprocessors=[("byte_tokenize", {"max_length": 4, "drop": True})]
    ).process(pa.record_batch({"uid": [1, 2, 3], "text": ["ab", "", None]}))
    assert out.result.schema.names == ["uid", "input_ids", "input_ids_mask"]
    assert out.result.column("input_ids").to_pylist() == [[100, 101, 0, 0], [0] * 4, [0] * 4]
    assert out.result.column("input_ids_mask").to_pylist() == [[1, 1, 0, 0], [0] * 4, [0] * 4]


def test_a_filter_must_answer_every_row() -> None:
    class Short(Filter, name="short"):
        def filter_batch(self, batch: pa.RecordBatch) -> pa.BooleanArray:
            return pa.array([True])

    plugins = Plugins()
    plugins.add(Short, "test")
    # a broken contract, not a sample's failure: no retry, no skip, no hint to skip
    for skip in (False, True):
        with pytest.raises(
            TransformFailed,
            match=r"^filter 'short': returned 1 answers for a batch of 2 rows; a filter answers "
            r"one boolean per row$",
        ):
            Pipeline.build(plugins, filters=[("short", {})], skip_on_failure=skip).filter(
                BATCH.slice(0, 2)
            )


def test_entry_points_are_a_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed package offers plugins through the ``lavender_flight.filters`` group."""
    (tmp_path / "lf_extra_plugins.py").write_text(
        "from lavender_flight.transforms import Filter\n\n"
        "class Positive(Filter, name='positive'):\n"
        "    '''Keeps positive uids.'''\n"
        "    def filter(self, sample: dict) -> bool:\n"
        "        return sample['uid'] > 0\n"
    )
    info = tmp_path / "lf_extra_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lf-extra-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[lavender_flight.filters]\npositive = lf_extra_plugins:Positive\n"
        "[lavender_flight.preprocessors]\nmissing = lf_extra_plugins:Nowhere\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = Plugins.load()
    assert plugins.filters.source("positive").startswith("entry point positive")
    keep, _ = Pipeline.build(plugins, filters=[("positive", {})]).filter(BATCH)
    assert keep.tolist() == [u > 0 for u in range(10)]
    (problem,) = plugins.problems
    assert "lf_extra_plugins:Nowhere" in problem and "AttributeError" in problem
    assert "positive" not in Plugins.load(entry_points=False).filters.names()


def test_the_expression_modulo_by_a_power_of_two_is_pythons_on_every_integer_type() -> None:
    # a power-of-two modulus is a bitwise and: the same as Python's % for negative numbers
    # and at the ends of every type (uint64 past int64 too, where Arrow's modulo refuses)
    plugins = Plugins.load()
    for kind in (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint64()):
        info = np.iinfo(kind.to_pandas_dtype())
        values = sorted(
            v
            for v in {int(info.min), int(info.min) + 1, -9, -2, -1, 0, 1, 5, 127, int(info.max)}
            if info.min <= v <= info.max
        )
        batch = pa.record_batch({"uid": pa.array(values, kind)})
        for modulus in (1, 2, 8, 64, 128, 256):
            for rest in {0, 1, modulus - 1}:
                expr = f"uid % {modulus} == {rest}"
                mask, _ = Pipeline.build(plugins, filters=[("expression", {"expr": expr})]).filter(
                    batch
                )
                assert mask.tolist() == [v % modulus == rest for v in values], (kind, expr)


def test_the_expression_modulo_is_exact_for_large_integers_and_pythons_for_signs() -> None:
    plugins = Plugins.load()
    uids = [2**60 + i for i in range(10)] + [-7, 7, 0]
    batch = pa.record_batch(
        {"uid": pa.array(uids, pa.int64()), "d": pa.array([3] * 10 + [3, -3, 0])}
    )

    def keep(expr: str) -> list[int]:
        mask, _ = Pipeline.build(plugins, filters=[("expression", {"expr": expr})]).filter(batch)
        return [u for u, k in zip(uids, mask.tolist(), strict=True) if k]

    # through float64, 2**60 + i all round to the same value: every one of them or none
    assert keep("uid % 10 == 4") == [u for u in uids if u % 10 == 4] == [2**60 + 8]
    assert keep("uid % 3 == 2") == [u for u in uids if u % 3 == 2]  # -7 % 3 == 2 in Python
    by_column = [u for u, d in zip(uids, [3] * 10 + [3, -3, 0], strict=True) if d and u % d == 1]
    assert keep("uid % d == 1") == by_column == [2**60, 2**60 + 3, 2**60 + 6, 2**60 + 9]
    # 7 % -3 is -2 (Python's sign), and a zero modulus keeps nothing
