"""Feature tables: every layout, missing and non-numeric cells, names, the vectorised fast path."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from sidecar.extract import FeatureTable, MappingSpec, Message, build_extractor
from sidecar.extract import tables as tables_module
from tests.fixtures_util import json_message

NOTHING = Message(b"", {})
NAN = math.nan


def table(value: Any, feature_names: tuple[str, ...] | None = None) -> FeatureTable:
    extract = build_extractor(None, MappingSpec(features="x", feature_names=feature_names))
    result = extract(json_message({"x": value}), NOTHING)
    assert result.errors == ()
    assert result.features is not None
    return result.features


def v2_table(inputs: list[dict[str, Any]], **body: Any) -> FeatureTable:
    request = json_message({"inputs": inputs, **body})
    result = build_extractor("open-inference-v2", None)(request, NOTHING)
    assert result.errors == ()
    assert result.features is not None
    return result.features


def test_rows_become_a_numeric_table_with_positional_names():
    """`[[...], [...]]` is rows x columns; unnamed columns are called "0", "1", ..."""
    found = table([[1, 2.5], [3, 4]])

    assert found.numeric.tolist() == [[1.0, 2.5], [3.0, 4.0]]
    assert found.numeric.dtype == np.float64
    assert found.columns == ("0", "1")
    assert not found.missing.any()
    assert not found.non_numeric.any()
    assert found.strings == {}


def test_feature_names_name_positional_columns_and_positions_fill_the_rest():
    """Config names apply in order; columns beyond them keep their position."""
    found = table([[1, 2, 3]], feature_names=("a", "b"))

    assert found.columns == ("a", "b", "2")


def test_a_flat_list_is_one_row():
    """A single flat row (`[5.1, 3.5, ...]`) is a one-row table."""
    assert table([5.1, 3.5, 1.4]).numeric.tolist() == [[5.1, 3.5, 1.4]]


def test_a_scalar_is_one_cell():
    """A bare number is a 1 x 1 table."""
    assert table(7).numeric.tolist() == [[7.0]]


def test_columns_dict_uses_its_keys_as_names():
    """`{"col": [v1, v2]}` gives one column per key, in order."""
    found = table({"b": [1, 2], "a": [3, 4]})

    assert found.columns == ("b", "a")
    assert found.numeric.tolist() == [[1.0, 3.0], [2.0, 4.0]]
    assert found.numeric.flags.c_contiguous


def test_columns_of_unequal_length_are_padded_with_missing_cells():
    """A shorter column is missing in the rows it does not reach."""
    found = table({"a": [1, 2], "b": [3]})

    assert found.missing.tolist() == [[False, False], [False, True]]


def test_records_use_keys_as_names_whatever_their_order():
    """`[{"col": v}, ...]` aligns values by key, even when records list keys in another order."""
    found = table([{"a": 1, "b": 2}, {"b": 4, "a": 3}])

    assert found.columns == ("a", "b")
    assert found.numeric.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_records_with_different_keys_take_the_union_and_mark_the_gaps_missing():
    """A key one record lacks is a missing cell, not a shifted column."""
    found = table([{"a": 1}, {"b": 2, "a": 3}])

    assert found.columns == ("a", "b")
    assert found.missing.tolist() == [[False, True], [False, False]]
    assert found.numeric[1].tolist() == [3.0, 2.0]


def test_nulls_are_missing_not_non_numeric():
    """null cells are flagged missing, their numeric value is NaN."""
    found = table([[1, None], [None, 4]])

    assert found.missing.tolist() == [[False, True], [True, False]]
    assert not found.non_numeric.any()
    assert found.numeric[0, 0] == 1.0
    assert math.isnan(found.numeric[0, 1])


def test_strings_are_non_numeric_and_kept_as_text_in_their_column_only():
    """A categorical column is flagged non-numeric with its text; numeric columns are untouched."""
    found = table([[1.5, "red"], [2.5, None], [3.5, "blue"]])

    assert found.non_numeric[:, 1].tolist() == [True, False, True]
    assert found.missing[:, 1].tolist() == [False, True, False]
    assert found.numeric[:, 0].tolist() == [1.5, 2.5, 3.5]
    assert list(found.strings) == ["1"]
    assert found.strings["1"].tolist() == ["red", None, "blue"]


def test_booleans_are_non_numeric_although_numpy_would_read_them_as_numbers():
    """true/false cells are non-numeric ("true"/"false"), never 1.0/0.0."""
    found = table([[1, True], [0, False]])

    assert found.non_numeric.tolist() == [[False, True], [False, True]]
    assert found.numeric[:, 0].tolist() == [1.0, 0.0]
    assert found.strings["1"].tolist() == ["true", "false"]


def test_zeros_and_ones_stay_numbers_when_the_body_holds_booleans_elsewhere():
    """A boolean outside the rows does not turn numeric 0/1 cells into booleans."""
    extract = build_extractor(None, MappingSpec(features="x"))
    result = extract(json_message({"x": [[0, 1], [1, 0]], "flag": True}), NOTHING)

    assert result.features is not None
    assert not result.features.non_numeric.any()
    assert result.features.numeric.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_nested_containers_in_cells_are_non_numeric_json_text():
    """A list or object inside a cell is non-numeric; its text is its JSON."""
    found = table([[1, [2, 3]], [4, {"k": 5}]])

    assert found.non_numeric[:, 1].all()
    assert found.strings["1"].tolist() == ["[2,3]", '{"k":5}']


def test_nan_and_infinity_literals_are_numbers():
    """NaN/Infinity literals are kept in numeric as nan/inf and are not missing."""
    found = table([[NAN, math.inf], [-math.inf, 1.0]])

    assert math.isnan(found.numeric[0, 0])
    assert found.numeric[0, 1] == math.inf
    assert found.numeric[1, 0] == -math.inf
    assert not found.missing.any()
    assert not found.non_numeric.any()


def test_ragged_rows_are_padded_with_missing_cells():
    """Cells a short row does not have are missing."""
    found = table([[1, 2, 3], [4]])

    assert found.numeric.shape == (2, 3)
    assert found.missing.tolist() == [[False, False, False], [False, True, True]]


def test_integers_beyond_a_double_become_infinite():
    """A JSON integer too large for float64 is +/-inf, not an error."""
    found = table([[10**400, -(10**400), 1]])

    assert found.numeric.tolist() == [[math.inf, -math.inf, 1.0]]


def test_an_empty_batch_is_a_table_of_zero_rows():
    """`[]` is a valid batch: zero rows, no error."""
    assert table([]).numeric.shape == (0, 0)


def test_an_empty_batch_keeps_the_configured_column_names():
    """With feature_names, an empty batch still has the configured columns."""
    found = table([], feature_names=("a", "b"))

    assert found.columns == ("a", "b")
    assert found.numeric.shape == (0, 2)


def test_higher_rank_rows_are_flattened_per_row():
    """A batch of matrices becomes one row per item, its cells flattened in row-major order."""
    assert table([[[1, 2], [3, 4]], [[5, 6], [7, 8]]]).numeric.tolist() == [
        [1.0, 2.0, 3.0, 4.0],
        [5.0, 6.0, 7.0, 8.0],
    ]


def test_v2_flat_data_is_reshaped_by_shape():
    """Flat row-major `data` with shape [2, 3] is two rows of three."""
    found = v2_table(
        [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]
    )

    assert found.numeric.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


def test_v2_one_dimensional_input_is_one_column():
    """Shape [n] is n rows of one feature."""
    found = v2_table([{"name": "x", "shape": [3], "datatype": "FP64", "data": [1, 2, 3]}])

    assert found.numeric.tolist() == [[1.0], [2.0], [3.0]]


def test_v2_nulls_in_data_are_missing():
    """A null inside a tensor is a missing cell, and the reshape still holds."""
    found = v2_table([{"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [1, None, 3, 4]}])

    assert found.missing.tolist() == [[False, True], [False, False]]


def test_v2_several_inputs_are_named_columns_and_wide_inputs_are_indexed():
    """Each one-wide input is a column named after it; a wider one gives name[j] columns."""
    found = v2_table(
        [
            {"name": "age", "shape": [2], "datatype": "FP64", "data": [30, 40]},
            {"name": "colour", "shape": [2], "datatype": "BYTES", "data": ["red", "blue"]},
            {"name": "emb", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]},
        ]
    )

    assert found.columns == ("age", "colour", "emb[0]", "emb[1]")
    assert found.strings["colour"].tolist() == ["red", "blue"]
    assert found.numeric[:, [0, 2, 3]].tolist() == [[30.0, 1.0, 2.0], [40.0, 3.0, 4.0]]


def test_v2_pandas_codec_with_one_input_names_the_column():
    """With content_type "pd", even a single input is named after itself."""
    found = v2_table(
        [{"name": "age", "shape": [2], "datatype": "FP64", "data": [30, 40]}],
        parameters={"content_type": "pd"},
    )

    assert found.columns == ("age",)


def test_large_numeric_batches_never_take_the_cell_by_cell_path(monkeypatch: pytest.MonkeyPatch):
    """100,000 numeric rows in every layout are read without classifying cells one by one."""

    def forbidden(*_: object) -> None:
        raise AssertionError("cell-by-cell path taken")

    monkeypatch.setattr(tables_module, "_classify", forbidden)
    rows = np.random.default_rng(0).normal(size=(100_000, 4)).round(3)
    names = ["a", "b", "c", "d"]
    layouts = [
        rows.tolist(),
        {name: rows[:, j].tolist() for j, name in enumerate(names)},
        [dict(zip(names, row, strict=True)) for row in rows.tolist()],
    ]
    for layout in layouts:
        assert table(layout).numeric.tolist() == rows.tolist()
    v2 = [{"name": "x", "shape": [100_000, 4], "datatype": "FP64", "data": rows.ravel().tolist()}]
    assert v2_table(v2).numeric.shape == (100_000, 4)
