"""``byte_tokenize`` against a plain-Python reference: edge cases of text, lengths and ids."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from lavender_flight.protocol.errors import InvalidArgument
from lavender_flight.transforms import Pipeline, Plugins
from lavender_flight.transforms.builtins import ByteTokenizer


def reference(
    texts: list[str | None], max_length: int, offset: int, pad_id: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Ids and masks, one row at a time: UTF-8 bytes + offset (int32 wrap), then pad_id."""
    ids, masks = [], []
    for text in texts:
        data = (text or "").encode()[:max_length]
        row = [((b + offset + 2**31) % 2**32) - 2**31 for b in data]
        ids.append(row + [pad_id] * (max_length - len(row)))
        masks.append([1] * len(row) + [0] * (max_length - len(row)))
    return ids, masks


def tokenize(batch: pa.RecordBatch, **params: object) -> pa.RecordBatch:
    full = {"column": "text", "max_length": 8, "output": "input_ids", "offset": 3}
    full.update({"pad_id": 0, "drop": False, **params})
    return ByteTokenizer().process(batch, **full)  # type: ignore[arg-type]


def test_empty_null_and_non_ascii_text() -> None:
    texts = ["", None, "é", "日本語", "😀x", "\x00a", "abcdefghijk", "ab日"]
    out = tokenize(pa.record_batch({"uid": list(range(len(texts))), "text": texts}))
    ids, masks = reference(texts, 8, 3, 0)
    assert out.column("input_ids").to_pylist() == ids
    assert out.column("input_ids_mask").to_pylist() == masks
    # a cut through a character keeps its first bytes: "ab日" is 5 bytes, 8 fit; "日本語" is 9
    assert out.column("input_ids_mask").to_pylist()[3] == [1] * 8
    assert out.column("input_ids").to_pylist()[3][:3] == [0xE6 + 3, 0x97 + 3, 0xA5 + 3]
    assert out.schema.field("input_ids").type == pa.list_(pa.int32(), 8)
    assert out.schema.field("input_ids_mask").type == pa.list_(pa.int8(), 8)
    assert out.column("text").to_pylist() == texts  # kept unless drop


def test_empty_batch_and_all_nulls() -> None:
    empty = tokenize(pa.record_batch({"text": pa.array([], pa.string())}))
    assert empty.num_rows == 0 and empty.column("input_ids").type == pa.list_(pa.int32(), 8)
    nulls = tokenize(pa.record_batch({"text": pa.array([None, None], pa.string())}), pad_id=7)
    assert nulls.column("input_ids").to_pylist() == [[7] * 8] * 2
    assert nulls.column("input_ids_mask").to_pylist() == [[0] * 8] * 2


@pytest.mark.parametrize("large", [False, True])
def test_random_text_matches_the_reference(large: bool) -> None:
    rng = random.Random(16)
    alphabet = ["a", "Z", " ", "é", "日", "😀", "\x00", "\n"]
    for _ in range(60):
        texts = [
            None
            if rng.random() < 0.1
            else "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            for _ in range(rng.randint(1, 40))
        ]
        start = rng.randint(0, len(texts) - 1)  # a slice: offsets that do not start at 0
        batch = pa.record_batch(
            {"text": pa.array(texts, pa.large_string() if large else pa.string())}
        ).slice(start)
        max_length = rng.choice([1, 2, 5, 16, 64, 1500])  # 1500: masks computed, not cached
        offset, pad_id = rng.choice([(3, 0), (0, -1), (-5, 2), (2**31 - 1, -(2**31))])
        out = tokenize(batch, max_length=max_length, offset=offset, pad_id=pad_id, drop=True)
        ids, masks = reference(texts[start:], max_length, offset, pad_id)
        assert out.schema.names == ["input_ids", "input_ids_mask"]
        assert out.column("input_ids").to_pylist() == ids
        assert out.column("input_ids_mask").to_pylist() == masks


def test_ids_that_do_not_fit_int32_are_an_error() -> None:
    batch = pa.record_batch({"text": ["a"]})
    with pytest.raises(InvalidArgument, match=r"^byte_tokenize offset must be an int32, got 2147"):
        tokenize(batch, offset=2**31)
    refused = r"byte_tokenize pad_id must be an int32, got -2147483649$"
    with pytest.raises(InvalidArgument, match=refused):  # when the iteration is created
        Pipeline.build(Plugins.load(), preprocessors=[("byte_tokenize", {"pad_id": -(2**31) - 1})])


def test_the_tokenizer_and_the_arrow_collater_are_rowwise() -> None:
    plugins = Plugins.load()
    tokenizing = Pipeline.build(plugins, preprocessors=[("byte_tokenize", {"max_length": 4})])
    assert tokenizing.rowwise
    assert Pipeline.build(plugins, collater=("arrow", {})).rowwise
    assert not Pipeline.build(plugins, filters=[("expression", {"expr": "uid > 1"})]).rowwise
