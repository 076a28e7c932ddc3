"""Protocol forms the live fixtures do not cover: Seldon v1, Triton extensions, other layouts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from sidecar.extract import PRESETS, Extraction, MappingSpec, Message, build_extractor
from tests.fixtures_util import json_message, route_params

NOTHING = Message(b"", {})
IRIS = ("setosa", "versicolor", "virginica")

# The widely published Seldon sklearnserver iris answer (servers.md section 4).
SELDON_NDARRAY_RESPONSE = {
    "data": {
        "names": ["t:0", "t:1", "t:2"],
        "ndarray": [[0.0006985194531162835, 0.00366803903943666, 0.995633441507447]],
    },
    "meta": {"requestPath": {"classifier": "seldonio/sklearnserver:1.13.1"}},
}
SELDON_TENSOR_RESPONSE = {
    "data": {
        "names": ["t:0", "t:1", "t:2"],
        "tensor": {"shape": [1, 3], "values": [0.87, 0.13, 7.59e-06]},
    },
    "meta": {},
}


def run(preset: str, request: Any, response: Any, mapping: MappingSpec | None = None) -> Extraction:
    return build_extractor(preset, mapping)(json_message(request), json_message(response))


def test_seldon_ndarray_request_uses_data_names_as_columns():
    """`data.names` names the feature columns of `data.ndarray`."""
    request = {"data": {"names": ["a", "b", "c", "d"], "ndarray": [[1, 2, 3, 4]]}}

    result = run("seldon-v1", request, SELDON_NDARRAY_RESPONSE)

    assert result.errors == ()
    assert result.features is not None
    assert result.features.columns == ("a", "b", "c", "d")
    assert result.features.numeric.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_seldon_generated_names_leave_classes_as_indices():
    """The wrapper's "t:0".. names are not labels: the argmax index is the class."""
    result = run("seldon-v1", {"data": {"ndarray": [[1, 2, 3, 4]]}}, SELDON_NDARRAY_RESPONSE)

    assert result.outputs.classes is not None
    assert result.outputs.confidence is not None
    assert result.outputs.classes.tolist() == ["2"]
    assert result.outputs.confidence.tolist() == [0.995633441507447]


def test_seldon_configured_class_names_label_the_probability_columns():
    """class_names from the config name the argmax column."""
    request = {"data": {"ndarray": [[1, 2, 3, 4]]}}

    result = run("seldon-v1", request, SELDON_NDARRAY_RESPONSE, MappingSpec(class_names=IRIS))

    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == ["virginica"]


def test_seldon_model_defined_names_label_the_probability_columns():
    """Names the model defines (not "t:i") are the class labels."""
    response = {"data": {"names": list(IRIS), "ndarray": [[0.1, 0.7, 0.2]]}}

    result = run("seldon-v1", {"data": {"ndarray": [[1, 2, 3, 4]]}}, response)

    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == ["versicolor"]


def test_seldon_tensor_form_is_reshaped_on_both_sides():
    """`data.tensor` values are reshaped by `shape` in request and response."""
    request = {"data": {"tensor": {"shape": [1, 4], "values": [5.3, 3.5, 1.4, 0.2]}}}

    result = run("seldon-v1", request, SELDON_TENSOR_RESPONSE)

    assert result.errors == ()
    assert result.features is not None
    assert result.features.numeric.tolist() == [[5.3, 3.5, 1.4, 0.2]]
    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == ["0"]


@pytest.mark.parametrize("key", ["jsonData", "strData", "binData"])
def test_seldon_free_form_payloads_yield_nothing_and_no_error(key: str):
    """jsonData/strData/binData carry nothing to read; that is not an error."""
    result = run("seldon-v1", {key: {"text": "hi"}}, {key: "ok"})

    assert result == Extraction()


def test_seldon_tftensor_is_reported_as_unsupported():
    """A TensorFlow TensorProto payload is not read, and says so."""
    result = run(
        "seldon-v1", {"data": {"tftensor": {"dtype": "DT_FLOAT"}}}, SELDON_NDARRAY_RESPONSE
    )

    assert result.errors == ("mapping",)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1.0/predictions", {}),
        ("/api/v0.1/predictions", {}),
        ("/predict", {}),
        (
            "/seldon/default/iris-model/api/v1.0/predictions",
            {"namespace": "default", "deployment": "iris-model"},
        ),
    ],
)
def test_seldon_routes_cover_wrapper_and_ingress_paths(path: str, params: dict[str, str]):
    """The microservice and ingress prediction paths are Seldon routes."""
    assert params in [route_params(route.path, path) for route in PRESETS["seldon-v1"].routes]


def test_triton_classification_output_gives_class_and_score():
    """A BYTES classification output `"<score>:<index>:<label>"` shaped [n, top-N] reads top-1."""
    response = {
        "model_name": "resnet",
        "model_version": "1",
        "outputs": [
            {
                "name": "OUTPUT0",
                "datatype": "BYTES",
                "shape": [2, 2],
                "data": ["15.3:2:virginica", "3.1:1:versicolor", "9.9:0:setosa", "1.0:2:virginica"],
            }
        ],
    }

    result = build_extractor("open-inference-v2", None)(NOTHING, json_message(response))

    assert result.errors == ()
    assert result.outputs.classes is not None
    assert result.outputs.confidence is not None
    assert result.outputs.classes.tolist() == ["virginica", "setosa"]
    assert result.outputs.confidence.tolist() == [15.3, 9.9]
    assert (result.model_name, result.model_version) == ("resnet", "1")


def test_v2_outputs_are_found_by_name_whatever_their_order():
    """`predict_proba` listed before `predict` still gives classes from predict."""
    response = {
        "outputs": [
            {"name": "predict_proba", "shape": [1, 2], "data": [0.3, 0.7]},
            {"name": "predict", "shape": [1], "data": ["yes"]},
        ]
    }

    result = build_extractor("open-inference-v2", None)(NOTHING, json_message(response))

    assert result.outputs.classes is not None
    assert result.outputs.confidence is not None
    assert result.outputs.classes.tolist() == ["yes"]
    assert result.outputs.confidence.tolist() == [0.7]


def test_v2_unknown_output_names_fall_back_to_the_first_output():
    """With no known name, the first output is the prediction (Triton model-defined names)."""
    response = {
        "outputs": [
            {"name": "logits", "shape": [2, 2], "data": [1, 5, 7, 2]},
            {"name": "x", "data": [9]},
        ]
    }

    result = build_extractor("open-inference-v2", None)(NOTHING, json_message(response))

    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == ["1", "0"]


def test_v2_null_output_values_are_rows_without_a_class():
    """A null inside an output tensor gives a row with no class; the rest are read."""
    response = {"outputs": [{"name": "predict", "shape": [3, 1], "data": [0, None, 2]}]}

    result = build_extractor("open-inference-v2", None)(NOTHING, json_message(response))

    assert result.errors == ()
    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == [
        "0",
        None,
        "2",
    ]


def test_v2_shape_that_does_not_fit_the_data_is_a_mapping_error():
    """A tensor whose data does not fill its shape is reported on its side only."""
    request = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3]}]}
    response = {"outputs": [{"name": "predict", "shape": [1], "data": [0]}]}

    result = run("open-inference-v2", request, response)

    assert result.errors == ("mapping",)
    assert result.features is None
    assert result.outputs.classes is not None


def test_v2_shape_claiming_too_many_columns_is_a_mapping_error():
    """An absurd width (an empty tensor of shape [0, 10**9]) is refused, not allocated."""
    request = {"inputs": [{"name": "x", "shape": [0, 10**9], "datatype": "FP32", "data": []}]}

    result = run("open-inference-v2", request, {"outputs": []})

    assert "mapping" in result.errors
    assert result.features is None


def test_torchserve_reads_a_data_envelope_and_a_single_record():
    """`{"data": rows}` is unwrapped; a plain object is one record with named columns."""
    response = [{"a": 0.9, "b": 0.1}]

    wrapped = run("torchserve", {"data": [[1, 2]]}, response)
    record = run("torchserve", {"x1": 1.5, "x2": 2.5}, response)

    assert wrapped.features is not None
    assert wrapped.features.numeric.tolist() == [[1.0, 2.0]]
    assert record.features is not None
    assert record.features.columns == ("x1", "x2")


def test_mlflow_inputs_may_be_a_list_of_rows():
    """MLflow `inputs` as a list of rows (no signature) is read like `instances`."""
    result = run("mlflow", {"inputs": [[1, 2], [3, 4]]}, {"predictions": [[0.2, 0.8], [0.6, 0.4]]})

    assert result.errors == ()
    assert result.features is not None
    assert result.features.numeric.shape == (2, 2)
    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == ["1", "0"]


def test_mlflow_request_without_a_known_layout_is_a_mapping_error():
    """A body with none of the four MLflow keys reports `mapping`; the response is still read."""
    result = run("mlflow", {"rows": [[1, 2]]}, {"predictions": [0]})

    assert result.errors == ("mapping",)
    assert result.outputs.classes is not None


def test_kserve_v1_instances_may_be_records():
    """KServe V1 `instances` of objects are records with named columns."""
    result = run("kserve-v1", {"instances": [{"a": 1, "b": "x"}]}, {"predictions": [1]})

    assert result.features is not None
    assert result.features.columns == ("a", "b")
    assert result.features.strings["b"].tolist() == ["x"]
    assert np.isnan(result.features.numeric[0, 1])
