"""Every preset against the real traffic it claims in tests/fixtures."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from sidecar.extract import PRESETS, MappingSpec, build_extractor
from sidecar.extract.presets import get_preset
from tests.fixtures_util import Exchange, exchange, load, route_params

SERVER_PRESETS = {
    "mlflow": ("mlflow",),
    "mlserver": ("open-inference-v2",),
    "kserve": ("kserve-v1", "open-inference-v2"),
    "torchserve": ("torchserve",),
}
IRIS = ("setosa", "versicolor", "virginica")
STANDARD_ROWS = [[5.1, 3.5, 1.4, 0.2], [7.0, 3.2, 4.7, 1.4], [6.3, 3.3, 6.0, 2.5]]
STANDARD_CLASSES = ["0", "1", "2"]
STANDARD_CONFIDENCE = [0.98166, 0.87423, 0.99606]
SIGNATURE = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def claiming_presets(item: Exchange) -> list[str]:
    return [
        name
        for name in SERVER_PRESETS.get(item.server, ())
        for route in PRESETS[name].routes
        if route.method == item.method and route_params(route.path, item.path) is not None
    ]


def successful(server: str) -> list[Exchange]:
    return [item for item in load(server) if 200 <= item.status < 300]


CLAIMED = [
    pytest.param(preset, item, id=f"{preset}-{item.id}")
    for server in SERVER_PRESETS
    for item in successful(server)
    for preset in claiming_presets(item)
]


# Independent readings of the fixtures, in plain Python, to compare the extractors against.
def expected_features(item: Exchange) -> tuple[list[list[float]], list[str]] | None:
    if item.request.headers.get("content-type") == "text/csv":
        return None
    body: Any = item.request_json()
    if isinstance(body, list):  # TorchServe: one raw row
        return [body], positions(len(body))
    if "dataframe_split" in body:
        split = body["dataframe_split"]
        return split["data"], split["columns"]
    if "inputs" in body and isinstance(body["inputs"], dict):
        columns = body["inputs"]
        return [list(row) for row in zip(*columns.values(), strict=True)], list(columns)
    if "inputs" in body and isinstance(body["inputs"][0], dict):  # Open Inference V2
        return v2_features(body)
    rows = next(body[key] for key in ("dataframe_records", "instances", "inputs") if key in body)
    if isinstance(rows[0], dict):
        return [list(row.values()) for row in rows], list(rows[0])
    return rows, positions(len(rows[0]))


def v2_features(body: dict[str, Any]) -> tuple[list[list[float]], list[str]]:
    inputs = body["inputs"]
    if len(inputs) > 1:  # pandas codec: one input per column
        columns = [flatten(tensor["data"]) for tensor in inputs]
        return [list(row) for row in zip(*columns, strict=True)], [t["name"] for t in inputs]
    (tensor,) = inputs
    values, (n, width) = flatten(tensor["data"]), tensor["shape"]
    return [values[i * width : (i + 1) * width] for i in range(n)], positions(width)


def expected_outputs(item: Exchange) -> tuple[list[str], list[float] | None]:
    body: Any = item.response_json()
    if isinstance(body, dict) and "outputs" in body:
        return v2_outputs(body["outputs"])
    if isinstance(body, dict) and "predictions" in body:
        body = body["predictions"]
    if isinstance(body, dict):
        body = [body]
    if isinstance(body[0], dict):  # TorchServe {label: probability}
        best = [max(row, key=row.get) for row in body]
        return best, [row[label] for row, label in zip(body, best, strict=True)]
    if isinstance(body[0], list):
        return argmax_rows(body)
    return [str(value) for value in body], None


def v2_outputs(outputs: list[dict[str, Any]]) -> tuple[list[str], list[float] | None]:
    tensors = {tensor["name"]: tensor for tensor in outputs}
    classes, confidence = None, None
    for tensor in outputs:
        values, shape = tensor["data"], tensor["shape"]
        width = shape[1] if len(shape) > 1 else 1
        if width == 1:
            classes = [str(value) for value in values]
        else:
            ranked = argmax_rows([values[i * width : (i + 1) * width] for i in range(shape[0])])
            classes = classes if "predict" in tensors else ranked[0]
            confidence = ranked[1]
    assert classes is not None
    return classes, confidence


def argmax_rows(rows: list[list[float]]) -> tuple[list[str], list[float]]:
    best = [max(range(len(row)), key=row.__getitem__) for row in rows]
    return [str(i) for i in best], [row[i] for row, i in zip(rows, best, strict=True)]


def flatten(data: list[Any]) -> list[Any]:
    return [value for item in data for value in flatten(item)] if isinstance(data, list) else [data]


def positions(width: int) -> list[str]:
    return [str(i) for i in range(width)]


@pytest.mark.parametrize(("preset", "item"), CLAIMED)
def test_preset_reads_each_claimed_exchange_as_its_payloads_say(preset: str, item: Exchange):
    """Features, classes and confidences equal an independent reading of the captured bodies."""
    result = build_extractor(preset, None)(item.request, item.response)

    assert result.errors == ()
    classes, confidence = expected_outputs(item)
    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == classes
    if confidence is None:
        assert result.outputs.confidence is None
    else:
        assert result.outputs.confidence is not None
        assert result.outputs.confidence.tolist() == confidence
    assert result.batch_size == len(classes)
    features = expected_features(item)
    if features is None:  # CSV passes through unparsed
        assert result.features is None
        return
    rows, columns = features
    assert result.features is not None
    assert result.features.numeric.tolist() == rows
    assert list(result.features.columns) == columns
    assert not result.features.missing.any()
    assert not result.features.non_numeric.any()


@pytest.mark.parametrize("server", SERVER_PRESETS)
def test_presets_claim_every_successful_inference_exchange_and_nothing_else(server: str):
    """A 2xx POST is claimed by exactly one preset route; health and metadata GETs by none."""
    for item in successful(server):
        claims = claiming_presets(item)
        if item.method == "POST":
            assert len(claims) == 1, item.id
        else:
            assert claims == [], item.id


@pytest.mark.parametrize(
    ("preset", "server", "name"),
    [
        ("mlflow", "mlflow", "proba_dataframe_split"),
        ("kserve-v1", "kserve", "proba_v1_predict_instances"),
        ("open-inference-v2", "kserve", "proba_v2_infer_nested"),
        ("open-inference-v2", "mlserver", "infer_flat_proba"),
        ("open-inference-v2", "mlserver", "infer_both_outputs"),
        ("open-inference-v2", "mlserver", "infer_pandas_codec_proba"),
        ("torchserve", "torchserve", "batch_instances"),
    ],
)
def test_standard_iris_rows_give_the_documented_classes(preset: str, server: str, name: str):
    """The README's three rows give setosa 0.98166, versicolor 0.87423, virginica 0.99606."""
    mapping = MappingSpec(class_names=IRIS)
    result = build_extractor(preset, mapping)(*messages(exchange(server, name)))

    assert result.errors == ()
    assert result.features is not None
    assert result.features.numeric.tolist() == STANDARD_ROWS
    assert result.outputs.classes is not None
    assert result.outputs.confidence is not None
    assert result.outputs.classes.tolist() == list(IRIS)
    np.testing.assert_allclose(result.outputs.confidence, STANDARD_CONFIDENCE, atol=5e-6)


@pytest.mark.parametrize(
    ("preset", "server", "name", "columns"),
    [
        ("mlflow", "mlflow", "big_batch_proba_dataframe_split", SIGNATURE),
        ("kserve-v1", "kserve", "proba_v1_big_batch", positions(4)),
        ("open-inference-v2", "kserve", "proba_v2_big_batch", positions(4)),
        ("open-inference-v2", "mlserver", "big_batch_both_outputs", positions(4)),
        ("torchserve", "torchserve", "big_batch_instances", positions(4)),
    ],
)
def test_big_batches_give_two_hundred_rows(preset: str, server: str, name: str, columns: list[str]):
    """A 200-row batch yields a 200 x 4 table and 200 classes with confidences in (0, 1]."""
    result = build_extractor(preset, None)(*messages(exchange(server, name)))

    assert result.errors == ()
    assert result.batch_size == 200
    assert result.features is not None
    assert result.features.numeric.shape == (200, 4)
    assert list(result.features.columns) == columns
    assert result.outputs.confidence is not None
    assert result.outputs.classes is not None
    assert len(result.outputs.classes) == 200
    assert ((result.outputs.confidence > 0) & (result.outputs.confidence <= 1)).all()


@pytest.mark.parametrize(
    ("server", "name", "model_name", "model_version"),
    [
        ("mlserver", "infer_nested", "iris-sklearn", "v1"),
        ("mlserver", "infer_proba_model_default", "iris-proba", None),
        ("kserve", "v2_infer_nested", "sklearn-iris", None),
    ],
)
def test_open_inference_reads_model_labels_from_the_response(
    server: str, name: str, model_name: str, model_version: str | None
):
    """V2 `model_name` is read; `model_version` may be absent or null (KServe)."""
    result = build_extractor("open-inference-v2", None)(*messages(exchange(server, name)))

    assert (result.model_name, result.model_version) == (model_name, model_version)


@pytest.mark.parametrize(
    ("server", "name"),
    [
        ("mlflow", "ping"),
        ("mlflow", "health"),
        ("mlserver", "health_ready"),
        ("mlserver", "model_ready"),
    ],
)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_exchanges_without_bodies_yield_nothing_and_no_error(preset: str, server: str, name: str):
    """Empty or whitespace-only bodies (health checks) are nothing to extract, not an error."""
    result = build_extractor(preset, None)(*messages(exchange(server, name)))

    assert result.errors == ()
    assert result.features is None
    assert result.outputs.classes is None
    assert result.outputs.confidence is None
    assert result.batch_size == 0


@pytest.mark.parametrize(
    ("preset", "server"),
    [
        ("mlflow", "mlflow"),
        ("kserve-v1", "kserve"),
        ("open-inference-v2", "kserve"),
        ("open-inference-v2", "mlserver"),
        ("torchserve", "torchserve"),
    ],
)
def test_health_path_is_a_readiness_endpoint_the_server_answers(preset: str, server: str):
    """Each preset's health_path was answered 200 by the real server."""
    health = get_preset(preset).health_path

    assert any(
        item.method == "GET" and item.path == health and item.status == 200 for item in load(server)
    )


@pytest.mark.parametrize(
    ("preset", "server", "name", "params"),
    [
        ("kserve-v1", "kserve", "v1_predict_instances", {"model": "sklearn-iris"}),
        ("open-inference-v2", "mlserver", "infer_nested", {"model": "iris-sklearn"}),
        (
            "open-inference-v2",
            "mlserver",
            "infer_fp32_single_row",
            {"model": "iris-sklearn", "version": "v1"},
        ),
        ("torchserve", "torchserve", "batch_instances", {"model": "iris"}),
        (
            "torchserve",
            "torchserve",
            "batch_instances_versioned_path",
            {"model": "iris", "version": "1.0"},
        ),
    ],
)
def test_route_templates_expose_model_and_version(
    preset: str, server: str, name: str, params: dict[str, str]
):
    """`{model}` and `{version}` segments capture the names in the real request paths."""
    item = exchange(server, name)
    found = [route_params(route.path, item.path) for route in get_preset(preset).routes]

    assert params in found


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_route_names_are_unique_within_a_preset(preset: str):
    """Route names become metric labels, so no two routes of a preset share one."""
    names = [route.name for route in PRESETS[preset].routes]

    assert len(names) == len(set(names))
    assert all(route.path.startswith("/") for route in PRESETS[preset].routes)


def test_registry_holds_the_six_protocol_presets():
    """The preset names are the ones the config accepts."""
    assert set(PRESETS) == {
        "mlflow",
        "kserve-v1",
        "open-inference-v2",
        "seldon-v1",
        "torchserve",
        "openai",
    }


def test_mlflow_csv_request_passes_unparsed_without_error():
    """A text/csv request yields no features and no error; the response is still read."""
    result = build_extractor("mlflow", None)(*messages(exchange("mlflow", "csv")))

    assert result.features is None
    assert result.errors == ()
    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == STANDARD_CLASSES


def test_torchserve_labels_come_from_the_response_dict():
    """TorchServe's {label: probability} keys are the classes, the best value the confidence."""
    result = build_extractor("torchserve", None)(
        *messages(exchange("torchserve", "kserve_v1_path"))
    )

    assert result.outputs.classes is not None
    assert result.outputs.confidence is not None
    assert result.outputs.classes.tolist() == ["setosa"]
    assert math.isclose(result.outputs.confidence[0], 0.981656829444016)


def messages(item: Exchange) -> tuple[Any, Any]:
    return item.request, item.response
