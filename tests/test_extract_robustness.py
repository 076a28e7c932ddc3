"""Bad input never raises: it is reported in `errors`, and the other side is kept.

Hypothesis feeds every extractor arbitrary JSON and arbitrary bytes, and checks that numeric
matrices survive every layout exactly.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sidecar.extract import PRESETS, Extraction, Extractor, MappingSpec, Message, build_extractor
from tests.fixtures_util import json_message

CUSTOM = MappingSpec(
    features="x",
    class_="y",
    probabilities="p",
    confidence="c",
    value="v",
    model_name="m",
    model_version="n",
)
EXTRACTORS: dict[str, Extractor] = {name: build_extractor(name, None) for name in PRESETS}
EXTRACTORS["custom"] = build_extractor(None, CUSTOM)
EXTRACTORS["preset+custom"] = build_extractor("open-inference-v2", CUSTOM)
ERROR_TYPES = {"request_parse", "response_parse", "mapping"}

# Valid envelopes per preset, to put bad content where each preset looks.
ENVELOPES: dict[str, tuple[Any, Any]] = {
    "mlflow": ({"instances": "ROWS"}, {"predictions": "PREDICTIONS"}),
    "kserve-v1": ({"instances": "ROWS"}, {"predictions": "PREDICTIONS"}),
    "open-inference-v2": (
        {"inputs": [{"name": "x", "shape": None, "datatype": "FP64", "data": "ROWS"}]},
        {"outputs": [{"name": "predict", "data": "PREDICTIONS"}]},
    ),
    "seldon-v1": ({"data": {"ndarray": "ROWS"}}, {"data": {"ndarray": "PREDICTIONS"}}),
    "torchserve": ("ROWS", "PREDICTIONS"),
}


def wrap(preset: str, rows: Any, predictions: Any) -> tuple[Message, Message]:
    request, response = ENVELOPES[preset]
    return json_message(fill(request, rows)), json_message(fill(response, predictions))


def fill(template: Any, value: Any) -> Any:
    if template in ("ROWS", "PREDICTIONS"):
        return value
    if isinstance(template, dict):
        return {key: fill(item, value) for key, item in template.items()}
    if isinstance(template, list):
        return [fill(item, value) for item in template]
    return template


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def check_consistent(result: Extraction) -> None:
    """Whatever came in, what comes out is shaped as the recorders expect."""
    assert isinstance(result, Extraction)
    assert set(result.errors) <= ERROR_TYPES
    assert len(set(result.errors)) == len(result.errors)
    table = result.features
    if table is not None:
        assert table.numeric.ndim == 2
        assert table.numeric.dtype == np.float64
        assert table.missing.shape == table.non_numeric.shape == table.numeric.shape
        assert len(table.columns) == table.numeric.shape[1]
        assert not (table.missing & table.non_numeric).any()
        assert set(table.strings) <= set(table.columns)
        assert all(len(texts) == table.n_rows for texts in table.strings.values())
    lengths = set()
    for array in (result.outputs.classes, result.outputs.confidence, result.outputs.value):
        if array is not None:
            assert array.ndim == 1
            lengths.add(len(array))
    assert len(lengths) <= 1
    if result.outputs.classes is not None:
        assert all(label is None or isinstance(label, str) for label in result.outputs.classes)
    assert result.batch_size >= 0
    assert result.model_name is None or isinstance(result.model_name, str)


@pytest.mark.parametrize("preset", sorted(ENVELOPES))
def test_malformed_request_is_request_parse_and_keeps_the_response(preset: str):
    """A request that is not JSON is reported; the response is still read."""
    _, response = wrap(preset, [[1, 2]], [0])

    result = EXTRACTORS[preset](Message(b'{"instances": [[1, 2]', {}), response)

    assert result.errors == ("request_parse",)
    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == ["0"]


@pytest.mark.parametrize("preset", sorted(ENVELOPES))
def test_malformed_response_is_response_parse_and_keeps_the_features(preset: str):
    """A response that is not JSON is reported; the features are still read."""
    request, _ = wrap(preset, [[1, 2]], [0])

    result = EXTRACTORS[preset](request, Message(b"Internal Server Error", {}))

    assert result.errors == ("response_parse",)
    assert result.features is not None
    assert result.features.numeric.tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize(
    ("preset", "request_value", "response_value"),
    [
        ("mlflow", {"rows": [[1]]}, {"result": [0]}),
        ("kserve-v1", [[1, 2]], [0]),
        ("open-inference-v2", {"inputs": {"x": 1}}, {"outputs": "none"}),
        ("seldon-v1", {"data": [1, 2]}, {"data": {"ndarray": 5, "tensor": 1}}),
        ("torchserve", None, {"a": [1, 2], "b": "x"}),
    ],
)
def test_payloads_of_the_wrong_shape_are_mapping_errors(
    preset: str, request_value: Any, response_value: Any
):
    """Valid JSON in the wrong shape is a `mapping` error, never an exception."""
    result = EXTRACTORS[preset](json_message(request_value), json_message(response_value))

    assert result.errors == ("mapping",)
    assert result.features is None
    check_consistent(result)


@pytest.mark.parametrize("preset", sorted(ENVELOPES))
def test_empty_batches_are_zero_rows_without_error(preset: str):
    """An empty batch is valid: no rows, no classes, no error."""
    request, response = wrap(preset, [], [])

    result = EXTRACTORS[preset](request, response)

    assert result.errors == ()
    assert result.batch_size == 0
    assert result.features is not None
    assert result.features.n_rows == 0


@pytest.mark.parametrize("preset", sorted(ENVELOPES))
def test_non_numeric_features_are_flagged_not_errors(preset: str):
    """Strings, booleans and nulls among the features are flagged cell by cell; no error."""
    request, response = wrap(preset, [[1.5, "red", True, None]], [1])

    result = EXTRACTORS[preset](request, response)

    assert result.errors == ()
    assert result.features is not None
    assert result.features.non_numeric.tolist() == [[False, True, True, False]]
    assert result.features.missing.tolist() == [[False, False, False, True]]


@pytest.mark.parametrize("preset", sorted(ENVELOPES))
def test_nan_literals_are_read_on_both_sides(preset: str):
    """NaN/Infinity literals are numbers in features; a NaN probability does not win argmax."""
    request, response = wrap(preset, [[math.nan, math.inf]], [[math.nan, 0.25, 0.75]])

    result = EXTRACTORS[preset](request, response)

    assert result.errors == ()
    assert result.features is not None
    assert math.isnan(result.features.numeric[0, 0])
    assert not result.features.missing.any()
    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == ["2"]


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_nesting_too_deep_to_parse_is_a_parse_error(name: str):
    """A 100,000-deep array cannot be parsed: reported, with no RecursionError escaping."""
    deep = Message(b"[" * 100_000 + b"]" * 100_000, {})

    result = EXTRACTORS[name](deep, deep)

    assert result.errors == ("request_parse", "response_parse")


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_deep_but_parseable_nesting_is_handled(name: str):
    """Deep nesting that parses (inside every envelope) yields a result, not an exception."""
    value = nested(900)
    bodies = [wrap(preset, value, value) for preset in ENVELOPES]
    bodies.append((json_message({"x": value, "y": value}), json_message({"p": value, "v": value})))

    for request, response in bodies:
        check_consistent(EXTRACTORS[name](request, response))


KEYS = st.sampled_from(
    [
        "instances", "inputs", "predictions", "outputs", "data", "ndarray", "tensor", "values",
        "shape", "names", "name", "dataframe_split", "dataframe_records", "columns",
        "parameters", "content_type", "model_name", "model_version", "x", "y", "p", "c", "v",
    ]
) | st.text(max_size=4)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["pd", "0.9:1:cat", "1:2", "t:0"])
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=40,
)


@settings(deadline=None, max_examples=150)
@given(request=JSON, response=JSON)
def test_no_extractor_raises_on_arbitrary_json(request: Any, response: Any):
    """Arbitrary JSON on either side gives a consistent Extraction, never an exception."""
    for extract in EXTRACTORS.values():
        check_consistent(extract(json_message(request), json_message(response)))


@settings(deadline=None, max_examples=100)
@given(rows=JSON, predictions=JSON)
def test_no_preset_raises_on_arbitrary_json_inside_its_envelope(rows: Any, predictions: Any):
    """Arbitrary content where each preset looks for rows and predictions never raises."""
    for preset in ENVELOPES:
        result = EXTRACTORS[preset](*wrap(preset, rows, predictions))
        check_consistent(result)
        assert result.features is not None or "mapping" in result.errors


@settings(deadline=None, max_examples=150)
@given(request=st.binary(max_size=200), response=st.binary(max_size=200))
def test_no_extractor_raises_on_arbitrary_bytes_and_parse_errors_are_reported(
    request: bytes, response: bytes
):
    """Bytes that are not JSON are reported as parse errors on their side."""
    for name, extract in EXTRACTORS.items():
        result = extract(Message(request, {}), Message(response, {}))
        check_consistent(result)
        if name in PRESETS and not is_json_or_blank(request):
            assert "request_parse" in result.errors
        if not is_json_or_blank(response):
            assert "response_parse" in result.errors


def is_json_or_blank(body: bytes) -> bool:
    if not body.strip():
        return True
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


MATRICES = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
    elements=st.floats(allow_nan=True, allow_infinity=True),
)


@settings(deadline=None, max_examples=100)
@given(matrix=MATRICES)
def test_numeric_matrices_round_trip_through_every_layout(matrix: np.ndarray):
    """Any float matrix (NaN and inf included) comes back exactly from every layout."""
    rows = matrix.tolist()
    names = [f"c{j}" for j in range(matrix.shape[1])]
    v2 = {"inputs": [{"name": "x", "shape": list(matrix.shape), "data": matrix.ravel().tolist()}]}
    cases = [
        ("kserve-v1", {"instances": rows}),
        ("mlflow", {"dataframe_records": [dict(zip(names, row, strict=True)) for row in rows]}),
        ("mlflow", {"inputs": {name: matrix[:, j].tolist() for j, name in enumerate(names)}}),
        ("mlflow", {"dataframe_split": {"columns": names, "data": rows}}),
        ("open-inference-v2", v2),
        (
            "seldon-v1",
            {"data": {"tensor": {"shape": list(matrix.shape), "values": matrix.ravel().tolist()}}},
        ),
    ]
    for preset, request in cases:
        result = EXTRACTORS[preset](json_message(request), Message(b"", {}))
        assert result.errors == ()
        assert result.features is not None
        np.testing.assert_array_equal(result.features.numeric, matrix)
        assert not result.features.missing.any()
        assert not result.features.non_numeric.any()
