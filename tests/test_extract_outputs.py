"""Model outputs: the generic rules for classes, confidence and regression values."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from sidecar.extract import Extraction, MappingSpec, Message, Outputs, build_extractor
from tests.fixtures_util import json_message

NOTHING = Message(b"", {})


def extract(response: Any, **mapping: Any) -> Extraction:
    return build_extractor(None, MappingSpec(**mapping))(NOTHING, json_message(response))


def outputs(response: Any, **mapping: Any) -> Outputs:
    result = extract(response, **mapping)
    assert result.errors == ()
    return result.outputs


def classes(found: Outputs) -> list[Any]:
    assert found.classes is not None
    return list(found.classes)


def confidence(found: Outputs) -> list[float]:
    assert found.confidence is not None
    return list(found.confidence)


def test_integer_classes_become_text_labels():
    """Class indices are labelled "0", "1", ... and carry no confidence."""
    found = outputs({"y": [0, 2, 1]}, class_="y")

    assert classes(found) == ["0", "2", "1"]
    assert found.confidence is None


def test_class_names_label_class_indices_and_out_of_range_indices_keep_their_number():
    """class_names[i] labels index i; an index past the list stays "i"."""
    found = outputs({"y": [0, 1, 5]}, class_="y", class_names=("cat", "dog"))

    assert classes(found) == ["cat", "dog", "5"]


def test_whole_floats_are_class_indices_and_fractions_are_their_own_label():
    """1.0 is class "1"; a non-integral number is labelled by its value."""
    assert classes(outputs({"y": [1.0, 1.5]}, class_="y")) == ["1", "1.5"]


def test_string_classes_are_kept_as_they_are():
    """Labels the model returns as text are the classes."""
    assert classes(outputs({"y": ["setosa", "virginica"]}, class_="y")) == ["setosa", "virginica"]


def test_a_scalar_class_is_one_row():
    """A single value (not a list) is a batch of one."""
    assert classes(outputs({"y": 2}, class_="y", class_names=("a", "b", "c"))) == ["c"]


def test_probability_rows_give_argmax_class_and_max_confidence():
    """Rows of probabilities: argmax is the class (named by class_names), max the confidence."""
    found = outputs({"p": [[0.1, 0.9], [0.7, 0.3]]}, probabilities="p", class_names=("neg", "pos"))

    assert classes(found) == ["pos", "neg"]
    assert confidence(found) == [0.9, 0.7]


def test_a_single_probability_vector_is_one_row():
    """A flat probability vector is one row."""
    found = outputs({"p": [0.2, 0.8]}, probabilities="p")

    assert (classes(found), confidence(found)) == (["1"], [0.8])


def test_nan_never_wins_argmax():
    """A NaN probability is skipped; a row of NaN has NaN confidence."""
    found = outputs({"p": [[math.nan, 0.4, 0.6], [math.nan, math.nan]]}, class_="p")

    assert classes(found)[0] == "2"
    assert confidence(found)[0] == 0.6
    assert math.isnan(confidence(found)[1])


def test_generic_class_rule_reads_vectors_as_probabilities():
    """With `class` pointing at vectors, the generic rule takes argmax and max."""
    found = outputs({"y": [[0.2, 0.8]]}, class_="y")

    assert (classes(found), confidence(found)) == (["1"], [0.8])


def test_a_column_of_width_one_is_a_column_of_classes():
    """`[[0], [1]]` (a predict output of shape [n, 1]) is classes, not probabilities."""
    assert classes(outputs({"y": [[0], [1]]}, class_="y")) == ["0", "1"]


def test_label_probability_dicts_give_their_best_item():
    """`{label: probability}` rows give the label with the highest probability."""
    found = outputs({"y": [{"a": 0.3, "b": 0.7}, {"a": 0.9, "b": 0.1}]}, class_="y")

    assert (classes(found), confidence(found)) == (["b", "a"], [0.7, 0.9])


def test_label_dicts_with_different_labels_are_read_row_by_row():
    """Top-k dicts with different labels per row still give each row's best."""
    found = outputs({"y": [{"a": 0.3, "b": 0.7}, {"c": 0.6}]}, class_="y")

    assert (classes(found), confidence(found)) == (["b", "c"], [0.7, 0.6])


def test_one_column_dataframe_records_give_their_value_as_class():
    """MLflow DataFrame output `[{"prediction": "setosa"}]` is class "setosa"."""
    assert classes(outputs({"y": [{"prediction": "setosa"}]}, class_="y")) == ["setosa"]


def test_triton_classification_strings_give_score_index_and_label():
    """`"<score>:<index>[:<label>]"`: the label, else the (named) index; the score is confidence."""
    found = outputs({"y": ["0.9:2:virginica", "0.8:0"]}, class_="y", class_names=("setosa",))

    assert (classes(found), confidence(found)) == (["virginica", "setosa"], [0.9, 0.8])


def test_triton_top_n_rows_take_the_first_entry():
    """Top-N classification rows are best first; the first is the prediction."""
    found = outputs({"y": [["0.7:1", "0.2:0"], ["0.6:0", "0.3:1"]]}, class_="y")

    assert (classes(found), confidence(found)) == (["1", "0"], [0.7, 0.6])


def test_predicted_classes_and_probabilities_are_combined():
    """A model returning both: classes from `class`, confidence from the probabilities."""
    found = outputs({"y": ["b", "a"], "p": [[0.4, 0.6], [0.8, 0.2]]}, class_="y", probabilities="p")

    assert (classes(found), confidence(found)) == (["b", "a"], [0.6, 0.8])


def test_explicit_confidence_wins_over_derived_confidence():
    """A `confidence` expression replaces the max of the probabilities."""
    found = outputs({"p": [[0.4, 0.6]], "c": [0.99]}, probabilities="p", confidence="c")

    assert confidence(found) == [0.99]


def test_regression_values_are_floats_and_a_column_is_squeezed():
    """`value` reads per-row numbers; `[[v], [v]]` is one value per row; null is NaN."""
    found = outputs({"v": [[1.5], [2], [None]]}, value="v")

    assert found.value is not None
    assert found.value.dtype == np.float64
    assert found.value[:2].tolist() == [1.5, 2.0]
    assert math.isnan(found.value[2])
    assert found.classes is None


def test_null_predictions_are_rows_without_a_class():
    """A null in a class list is None for that row; the other rows are still labelled."""
    assert classes(outputs({"y": [0, None, 2]}, class_="y")) == ["0", None, "2"]


@pytest.mark.parametrize(
    "mapping",
    [
        {"class_": "y", "probabilities": "p"},
        {"class_": "y", "value": "v"},
    ],
)
def test_outputs_of_different_lengths_are_a_mapping_error(mapping: dict[str, str]):
    """Per-row outputs that disagree on the row count are dropped and reported."""
    result = extract({"y": [0, 1, 2], "p": [[0.1, 0.9]], "v": [1.0]}, **mapping)

    assert "mapping" in result.errors
    assert result.outputs == Outputs()


def test_features_and_outputs_of_different_lengths_are_a_mapping_error():
    """Three feature rows but two predictions: both kept, the mismatch reported."""
    extractor = build_extractor(None, MappingSpec(features="x", class_="y"))
    result = extractor(json_message({"x": [[1], [2], [3]]}), json_message({"y": [0, 1]}))

    assert result.errors == ("mapping",)
    assert result.features is not None
    assert result.outputs.classes is not None
    assert result.batch_size == 3
