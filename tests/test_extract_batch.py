"""Many exchanges read as one batch give what reading each alone gives, row for row."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.extract import MappingSpec, Message
from sidecar.extract.batch import MAX_MERGED_ROWS
from sidecar.extract.compile import build_readers
from sidecar.extract.types import Extraction
from tests.fixtures_util import SERVERS, load

JSON = {"content-type": "application/json"}
BATCHING_PRESETS = ("kserve-v1", "mlflow", "torchserve")


def message(value: Any) -> Message:
    return Message(json.dumps(value).encode(), JSON)


def assert_same_rows(merged: Extraction, start: int, alone: Extraction) -> None:
    """Rows start.. of the merged extraction are the single exchange's extraction (which read
    without errors and found only numbers)."""
    stop = start + alone.batch_size
    assert merged.features is not None
    rows = Extraction(
        features=merged.features.rows(start, stop),
        outputs=merged.outputs.rows(start, stop),
        batch_size=alone.batch_size,
        model_name=alone.model_name,  # names are read per exchange, not merged
        model_version=alone.model_version,
    )
    assert_same_extraction(rows, alone)


def assert_same_extraction(ours: Extraction, theirs: Extraction) -> None:
    assert (ours.errors, ours.batch_size) == (theirs.errors, theirs.batch_size)
    assert (ours.model_name, ours.model_version) == (theirs.model_name, theirs.model_version)
    if theirs.features is None:
        assert ours.features is None
    else:
        assert ours.features is not None
        assert ours.features.columns == theirs.features.columns
        for field in ("numeric", "missing", "non_numeric"):
            np.testing.assert_array_equal(
                getattr(ours.features, field), getattr(theirs.features, field)
            )
        assert ours.features.strings.keys() == theirs.features.strings.keys()
        for name, texts in theirs.features.strings.items():
            np.testing.assert_array_equal(ours.features.strings[name], texts)
    for field in ("classes", "confidence", "value"):
        mine, other = getattr(ours.outputs, field), getattr(theirs.outputs, field)
        if other is None:
            assert mine is None
        else:
            np.testing.assert_array_equal(mine, other)


def check_batch(preset: str, pairs: list[tuple[Message, Message]], **mapping: Any) -> list[int]:
    """Compare the batch reader with the one-exchange extractor; return the merged positions."""
    spec = MappingSpec(**mapping) if mapping else None
    extract, read = build_readers(preset, spec)
    assert read is not None
    batch = read(pairs)
    merged_positions = batch.merged.members if batch.merged is not None else []
    assert sorted([*merged_positions, *(p for p, _ in batch.alone)]) == list(range(len(pairs)))
    for position, extraction in batch.alone:  # read alone from the bodies decoded once
        assert_same_extraction(extraction, extract(*pairs[position]))
    merged = batch.merged
    if merged is None:
        return []
    assert sum(merged.row_counts) == merged.extraction.batch_size
    start = 0
    for position, rows in zip(merged.members, merged.row_counts, strict=True):
        alone = extract(*pairs[position])
        assert alone.batch_size == rows
        assert_same_rows(merged.extraction, start, alone)
        start += rows
    return merged.members


def test_numeric_rows_from_many_requests_merge_into_one_batch():
    pairs = [
        (
            message({"instances": [[float(i), 1.0, 2.0, 3.0]] * (1 + i % 3)}),
            message({"predictions": [[0.1, 0.2 + i / 100, 0.3]] * (1 + i % 3)}),
        )
        for i in range(20)
    ]
    members = check_batch("kserve-v1", pairs, class_names=("a", "b", "c"))
    assert members == list(range(20))
    v2 = [
        (
            message({"inputs": [v2_tensor([[float(i), 1.0, 2.0, 3.0]], flat=i % 2 == 0)]}),
            message({"outputs": [v2_tensor([[0.1, 0.2 + i / 100, 0.3]], flat=i % 3 == 0)]}),
        )
        for i in range(20)
    ]
    assert check_batch("open-inference-v2", v2) == list(range(20))


def test_only_well_formed_exchanges_merge_and_the_rest_are_left_alone():
    good = (message({"instances": [[1, 2]]}), message({"predictions": [[0.9, 0.1]]}))
    odd = [
        (message({"instances": [[1, None]]}), message({"predictions": [[0.9, 0.1]]})),  # null
        (message({"instances": [[1, 2]]}), message({"predictions": [[0.9, 0.1]] * 2})),  # 1 vs 2
        (Message(b"{not json", JSON), message({"predictions": [[0.9, 0.1]]})),
        (message({"instances": [1, 2]}), message({"predictions": [0]})),  # a flat row
        (message({"rows": [[1, 2]]}), message({"predictions": [[0.9, 0.1]]})),  # no instances
        (message({"instances": [[1, 2]] * (MAX_MERGED_ROWS + 1)}), message({"predictions": [0]})),
    ]
    pairs = [good, *odd, good]
    assert check_batch("kserve-v1", pairs) == [0, len(pairs) - 1]


def test_rows_that_do_not_read_as_one_array_are_not_merged():
    """A string in one request makes the merged table non-numeric: nothing is merged, and the
    one-exchange extractor reads each request as before."""
    pairs = [
        (message({"instances": [[1, 2]]}), message({"predictions": [[0.9, 0.1]]})),
        (message({"instances": [[1, "x"]]}), message({"predictions": [[0.9, 0.1]]})),
    ]
    _, read = build_readers("kserve-v1", None)
    assert read is not None
    assert read(pairs).merged is None


def test_a_mapping_with_its_own_readers_has_no_batch_reader():
    assert build_readers("kserve-v1", MappingSpec(features="instances"))[1] is None
    assert build_readers("seldon-v1", None)[1] is None
    assert build_readers(None, MappingSpec(features="x"))[1] is None
    assert build_readers("kserve-v1", MappingSpec(class_names=("a", "b")))[1] is not None


CELLS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.integers(-5, 5),
    st.booleans(),
    st.none(),
    st.sampled_from(["a", "1"]),
)


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[Any, Any]:
    n = draw(st.integers(1, 3))
    width = draw(st.sampled_from([2, 3]))
    records = draw(st.booleans())
    plain = draw(st.booleans())  # mostly clean numbers, so that merging is exercised
    cell = st.floats(-10, 10, width=32) if plain else CELLS
    rows = [[draw(cell) for _ in range(width)] for _ in range(n)]
    features: Any = [{f"f{j}": row[j] for j in range(width)} for row in rows] if records else rows
    layout = draw(st.sampled_from(["probabilities", "classes", "label_dicts"]))
    if layout == "probabilities":
        predictions: Any = [[draw(st.floats(0, 1, width=32)) for _ in range(3)] for _ in rows]
    elif layout == "classes":
        predictions = [draw(st.integers(0, 2)) for _ in rows]
    else:
        predictions = [{"x": draw(st.floats(0, 1)), "y": draw(st.floats(0, 1))} for _ in rows]
    return features, predictions


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(BATCHING_PRESETS), st.lists(exchanges(), min_size=2, max_size=6))
def test_merged_rows_equal_each_exchange_read_alone(preset: str, drawn: list[tuple[Any, Any]]):
    pairs = []
    for features, predictions in drawn:
        if preset == "torchserve":
            pairs.append((message(features), message(predictions)))
        else:
            key = (
                "dataframe_records"
                if preset == "mlflow" and isinstance(features[0], dict)
                else "instances"
            )
            pairs.append((message({key: features}), message({"predictions": predictions})))
    check_batch(preset, pairs)


def v2_tensor(rows: list[list[Any]] | list[Any], flat: bool) -> dict[str, Any]:
    """A V2 tensor of `rows` (lists: shape [n, k]; scalars: shape [n]), data nested or flat."""
    if rows and isinstance(rows[0], list):
        shape = [len(rows), len(rows[0])]
        data = [cell for row in rows for cell in row] if flat else rows
    else:
        shape, data = [len(rows)], rows
    return {"name": "t", "shape": shape, "datatype": "FP64", "data": data}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(exchanges(), st.booleans(), st.booleans()), min_size=2, max_size=6))
def test_open_inference_tensors_merge_as_they_read_alone(drawn: list[Any]):
    pairs = []
    for (features, predictions), flat_in, flat_out in drawn:
        rows = [list(row.values()) if isinstance(row, dict) else row for row in features]
        if isinstance(predictions[0], dict):  # no label dicts in V2: probabilities instead
            predictions = [[row["x"], row["y"]] for row in predictions]
        request = {"inputs": [v2_tensor(rows, flat_in)]}
        response = {"model_name": "m", "outputs": [v2_tensor(predictions, flat_out)]}
        pairs.append((message(request), message(response)))
    check_batch("open-inference-v2", pairs)


SERVER_PRESETS = {
    "kserve": "kserve-v1",
    "mlflow": "mlflow",
    "torchserve": "torchserve",
    "mlserver": "open-inference-v2",
}


@pytest.mark.parametrize("server", [s for s in SERVERS if s in SERVER_PRESETS])
def test_captured_exchanges_merge_as_they_read_alone(server: str):
    preset = SERVER_PRESETS[server]
    """Each captured exchange twice over (one model's traffic has one shape; the fixtures hold
    many models, whose rows would not read as one array)."""
    merged = 0
    for item in load(server):
        if 200 <= item.status < 300:
            merged += len(check_batch(preset, [(item.request, item.response)] * 2)) // 2
    assert merged > 0
