"""Mapping config: decoding and validation, custom JMESPath readers, and presets with overrides."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from sidecar.extract import MappingSpec, Message, build_extractor
from tests.fixtures_util import exchange, json_message

NOTHING = Message(b"", {})


class Route(msgspec.Struct, forbid_unknown_fields=True):
    mapping: MappingSpec


class Config(msgspec.Struct):
    routes: list[Route]


def decode(mapping: str) -> MappingSpec:
    document = f'{{"routes": [{{"mapping": {mapping}}}]}}'
    return msgspec.json.decode(document, type=Config).routes[0].mapping


def test_mapping_decodes_every_key_including_class():
    """All keys decode; the YAML key `class` lands on `class_`."""
    spec = decode(
        '{"features": "a", "feature_names": ["x"], "class": "b", "confidence": "c",'
        ' "probabilities": "d", "class_names": ["n"], "value": "e",'
        ' "model_name": "f", "model_version": "g"}'
    )

    assert spec.class_ == "b"
    assert spec.feature_names == ("x",)
    assert spec.class_names == ("n",)
    assert spec.model_version == "g"


def test_unknown_mapping_keys_are_rejected_with_their_config_path():
    """A misspelt key fails decoding and names where it is."""
    with pytest.raises(msgspec.ValidationError, match=r"confidnce.*\$\.routes\[0\]\.mapping"):
        decode('{"confidnce": "c"}')


def test_bad_jmespath_fails_decoding_naming_the_expression_and_the_config_path():
    """A JMESPath that does not parse is reported with the expression and its config path."""
    with pytest.raises(msgspec.ValidationError) as caught:
        decode('{"probabilities": "predictions[*.prob"}')

    message = str(caught.value)
    assert "'predictions[*.prob' is not a valid JMESPath expression" in message
    assert "$.routes[0].mapping" in message


@pytest.mark.parametrize(
    ("key", "expression", "complaint"),
    [
        ("features", "instances[", "Incomplete expression"),
        ("class_", "", "cannot be empty"),
        ("value", "nofunc(v)", "unknown function nofunc()"),
        ("confidence", "max(a, b)", "max() takes 1 argument(s), got 2"),
        ("model_name", "`bad", "Unclosed ` delimiter"),
    ],
)
def test_bad_expression_raises_value_error_naming_it(key: str, expression: str, complaint: str):
    """Construction raises ValueError with the expression and the parser's complaint."""
    settings: dict[str, Any] = {key: expression}
    with pytest.raises(ValueError, match="is not a valid JMESPath expression") as caught:
        MappingSpec(**settings)

    assert repr(expression) in str(caught.value)
    assert complaint in str(caught.value)


def test_unknown_preset_lists_the_known_ones():
    """An unknown preset name is a ValueError that lists every known preset."""
    with pytest.raises(ValueError, match="unknown preset 'tfserving'") as caught:
        build_extractor("tfserving", None)

    known = "kserve-v1, mlflow, open-inference-v2, openai, seldon-v1, torchserve"
    assert known in str(caught.value)


def test_no_preset_and_no_mapping_reads_nothing():
    """A route without extraction never parses; even garbage bodies give no error."""
    garbage = Message(b"\xff{not json", {})

    result = build_extractor(None, None)(garbage, garbage)

    assert result.errors == ()
    assert result.features is None
    assert result.batch_size == 0


def test_custom_mapping_reads_features_classes_and_model_labels():
    """JMESPaths into request and response give features, classes and model labels."""
    spec = MappingSpec(
        features="payload.rows",
        feature_names=("a", "b"),
        class_="result[*].label",
        confidence="result[*].score",
        model_name="meta.model",
        model_version="meta.version",
    )
    request = json_message({"payload": {"rows": [[1, 2], [3, 4]]}})
    response = json_message(
        {
            "result": [{"label": "x", "score": 0.5}, {"label": "y", "score": 0.25}],
            "meta": {"model": "m", "version": 3},
        }
    )

    result = build_extractor(None, spec)(request, response)

    assert result.errors == ()
    assert result.features is not None
    assert result.features.columns == ("a", "b")
    assert result.outputs.classes is not None
    assert result.outputs.confidence is not None
    assert result.outputs.classes.tolist() == ["x", "y"]
    assert result.outputs.confidence.tolist() == [0.5, 0.25]
    assert (result.model_name, result.model_version) == ("m", "3")


def test_a_features_path_that_finds_nothing_is_a_mapping_error():
    """`features` pointing at an absent key reports `mapping` and keeps the response side."""
    spec = MappingSpec(features="missing", class_="y")

    result = build_extractor(None, spec)(json_message({"x": 1}), json_message({"y": [1]}))

    assert result.errors == ("mapping",)
    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == ["1"]


def test_a_jmespath_type_error_at_request_time_is_a_mapping_error():
    """A function applied to the wrong type at request time is reported, not raised."""
    spec = MappingSpec(value="abs(v)")

    result = build_extractor(None, spec)(NOTHING, json_message({"v": "text"}))

    assert result.errors == ("mapping",)


def test_preset_class_names_label_probability_columns():
    """class_names with a preset names the argmax of MLflow probability rows."""
    spec = MappingSpec(class_names=("setosa", "versicolor", "virginica"))
    item = exchange("mlflow", "proba_dataframe_split")

    result = build_extractor("mlflow", spec)(item.request, item.response)

    assert result.outputs.classes is not None
    assert result.outputs.classes.tolist() == ["setosa", "versicolor", "virginica"]


def test_preset_feature_names_name_positional_columns_but_payload_names_win():
    """feature_names name KServe V1 rows; MLflow's own dataframe_split columns take precedence."""
    spec = MappingSpec(feature_names=("a", "b", "c", "d"))
    kserve = exchange("kserve", "v1_predict_instances")
    mlflow = exchange("mlflow", "dataframe_split")

    kserve_result = build_extractor("kserve-v1", spec)(kserve.request, kserve.response)
    mlflow_result = build_extractor("mlflow", spec)(mlflow.request, mlflow.response)

    assert kserve_result.features is not None
    assert mlflow_result.features is not None
    assert kserve_result.features.columns == ("a", "b", "c", "d")
    assert mlflow_result.features.columns[0] == "sepal_length"


def test_a_value_mapping_replaces_the_presets_output_reading_as_a_group():
    """A regression `value` on a V2 route gives values and no made-up classes."""
    spec = MappingSpec(value="outputs[0].data")
    response = json_message({"model_name": "r", "outputs": [{"name": "predict", "data": [1.5]}]})

    result = build_extractor("open-inference-v2", spec)(NOTHING, response)

    assert result.errors == ()
    assert result.outputs.value is not None
    assert result.outputs.value.tolist() == [1.5]
    assert result.outputs.classes is None
    assert result.model_name == "r"


def test_a_features_mapping_replaces_the_presets_feature_reading():
    """An explicit `features` path overrides where the preset looks."""
    spec = MappingSpec(features="custom")
    request = json_message({"custom": [[1, 2]], "instances": [[9, 9, 9]]})

    result = build_extractor("kserve-v1", spec)(request, json_message({"predictions": [0]}))

    assert result.features is not None
    assert result.features.numeric.tolist() == [[1.0, 2.0]]


def test_model_label_paths_override_the_presets():
    """model_name/model_version paths replace V2's response fields."""
    spec = MappingSpec(model_name="parameters.name", model_version="parameters.rev")
    response = json_message(
        {
            "model_name": "ignored",
            "parameters": {"name": "real", "rev": 7},
            "outputs": [{"name": "predict", "data": [0]}],
        }
    )

    result = build_extractor("open-inference-v2", spec)(NOTHING, response)

    assert (result.model_name, result.model_version) == ("real", "7")
