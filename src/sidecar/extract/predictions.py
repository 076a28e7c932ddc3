"""Model outputs from prediction payloads, by the rules every preset shares.

A scalar is a class; a vector is a probability row (argmax is the class, max the confidence); a
`{label: probability}` object gives its best item; Triton classification strings
`"<score>:<index>[:<label>]"` carry both. Numeric work is done on whole arrays; per-row Python runs
only for label dicts, strings and mixed payloads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from sidecar.extract import sliced
from sidecar.extract.errors import MappingError
from sidecar.extract.types import Outputs

__all__ = [
    "ClassNames",
    "as_array",
    "combine",
    "read_floats",
    "read_prediction_rows",
    "read_predictions",
    "read_probabilities",
]

Labels = NDArray[np.object_]
Floats = NDArray[np.float64]

# Integers beyond 2**53 are not exact in a double; such "classes" are labelled by their text.
_EXACT_INTEGER: Final = 2.0**53


class ClassNames:
    """Class index -> label: `class_names[i]` when configured and in range, else `str(i)`."""

    __slots__ = ("_lookup", "names")

    def __init__(self, names: Sequence[str] | None = None) -> None:
        self.names = tuple(names) if names else None
        self._lookup = np.asarray(self.names, dtype=object) if self.names else None

    def labels(self, indices: NDArray[np.int64]) -> Labels:
        """Labels for an array of class indices (vectorised)."""
        if indices.size > sliced.CHUNK_ROWS:
            # Text for each distinct class, spread over the rows: made for every row, it took one
            # call of 150 ms for 450,000 rows (sidecar.extract.sliced says why that matters).
            distinct, where = np.unique(indices, return_inverse=True)
            return self._labels(distinct)[where]
        return self._labels(indices)

    def _labels(self, indices: NDArray[np.int64]) -> Labels:
        out: Labels = indices.astype(str).astype(object)
        if self._lookup is not None and out.size:
            known = (indices >= 0) & (indices < len(self._lookup))
            out[known] = self._lookup[indices[known]]
        return out

    def label(self, index: int) -> str:
        if self.names is not None and 0 <= index < len(self.names):
            return self.names[index]
        return str(index)


def read_predictions(value: Any, classes: ClassNames) -> Outputs:
    """Outputs from a per-row prediction payload (list, array, a single object or a scalar)."""
    if isinstance(value, dict):
        return _label_dicts([value], classes)
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _label_dicts(value, classes)
    if value is None:
        msg = "no predictions at the mapped place"
        raise MappingError(msg)
    array = as_array(value)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]  # a column of classes, e.g. V2 "predict" with shape [n, 1]
    kind = array.dtype.kind
    if kind in "biuf" and array.ndim == 1:
        return Outputs(classes=_number_labels(array, classes))
    if kind in "biuf" and array.ndim == 2:
        return read_probabilities(array, classes)
    if kind == "U" and array.ndim in (1, 2):
        # Triton classification answers top-N per row, best first: the first one is the prediction.
        return _strings(array if array.ndim == 1 else array[:, 0], classes)
    if kind == "O" and array.ndim in (1, 2):
        return _mixed(array.tolist(), classes)
    msg = f"cannot read predictions from an array of dtype {array.dtype} and shape {array.shape}"
    raise MappingError(msg)


def read_prediction_rows(rows: list[Any], classes: ClassNames) -> Outputs | None:
    """What read_predictions gives for a list of rows when it can read them as one array: numbers
    (classes), rows of probabilities, or label dicts with the same keys; None for anything else.

    On these paths every row is read alone (argmax, max, label lookup), so the outputs of rows
    concatenated from many payloads are those of each payload, concatenated.
    """
    if isinstance(rows[0], dict):
        keys = tuple(rows[0])
        return _best_of(_uniform_values(rows, keys), keys)
    try:
        array = sliced.asarray(rows)
    except (ValueError, TypeError, RecursionError):  # ragged
        return None
    if array.dtype.kind not in "biuf" or array.ndim not in (1, 2) or array.size == 0:
        return None
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]  # a column of classes
    if array.ndim == 1:
        return Outputs(classes=_number_labels(array, classes))
    return read_probabilities(array, classes)


def read_probabilities(value: Any, classes: ClassNames) -> Outputs:
    """argmax -> class, max -> confidence, for rows of probabilities (one flat vector = one row)."""
    try:
        matrix = sliced.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        msg = f"probabilities are not a numeric matrix: {exc}"
        raise MappingError(msg) from None
    if matrix.ndim == 1:
        matrix = matrix.reshape(1, -1)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        msg = f"probabilities have shape {matrix.shape}, expected rows x classes"
        raise MappingError(msg)
    # NaN must not win argmax; fmax ignores NaN, so a row is NaN only when all of it is.
    best = np.argmax(np.where(np.isnan(matrix), -np.inf, matrix), axis=1)
    return Outputs(classes=classes.labels(best), confidence=np.fmax.reduce(matrix, axis=1))


def read_floats(value: Any) -> Floats:
    """Per-row numbers (confidence, regression value); a null row is NaN, a scalar is one row."""
    if value is None:
        msg = "no numbers at the mapped place"
        raise MappingError(msg)
    try:
        array = sliced.asarray(value if isinstance(value, list) else [value], dtype=np.float64)
    except (ValueError, TypeError) as exc:
        msg = f"expected numbers: {exc}"
        raise MappingError(msg) from None
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        msg = f"expected one number per row, got shape {array.shape}"
        raise MappingError(msg)
    return array


def combine(predicted: Outputs, probabilities: Outputs) -> Outputs:
    """Classes from one output, confidence from another (a model that returns both)."""
    classes, confidence = predicted.classes, probabilities.confidence
    if classes is not None and confidence is not None and len(classes) != len(confidence):
        msg = f"{len(classes)} predicted classes but {len(confidence)} probability rows"
        raise MappingError(msg)
    return Outputs(classes=classes, confidence=confidence, value=predicted.value)


def tensor_rows(data: Any, shape: Any) -> NDArray[Any]:
    """A tensor's values as rows: shape [n] stays flat, [n, ...] becomes n rows of the rest.

    `data` may be nested or flat (row-major); without a usable shape it is taken as it is.
    """
    array = as_array(data)
    if not isinstance(shape, list) or not shape or not all(type(d) is int for d in shape):
        return array
    if math.prod(shape) != array.size:
        msg = f"tensor has {array.size} values for shape {shape}"
        raise MappingError(msg)
    return array.reshape(shape[0], -1) if len(shape) > 1 else array.reshape(shape[0])


def as_array(value: Any) -> NDArray[Any]:
    """`value` as a numpy array; a ragged list becomes a 1-D object array of its rows."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return sliced.asarray(value)
    except (ValueError, TypeError, RecursionError):
        out = np.empty(len(value), dtype=object)
        for i, item in enumerate(value):
            out[i] = item
        return out


def _number_labels(array: NDArray[Any], classes: ClassNames) -> Labels:
    if array.dtype.kind in "bi":
        return classes.labels(array.astype(np.int64))
    numbers = array.astype(np.float64)
    exact = (
        np.isfinite(numbers) & (np.trunc(numbers) == numbers) & (np.abs(numbers) < _EXACT_INTEGER)
    )
    if exact.all():
        return classes.labels(numbers.astype(np.int64))
    out: Labels = np.empty(len(numbers), dtype=object)
    out[exact] = classes.labels(numbers[exact].astype(np.int64))
    out[~exact] = [repr(number) for number in numbers[~exact].tolist()]
    return out


def _strings(array: NDArray[Any], classes: ClassNames) -> Outputs:
    texts: list[str] = array.tolist()
    if not texts or _triton(texts[0]) is None:
        return Outputs(classes=array.astype(object))
    labels: Labels = np.empty(len(texts), dtype=object)
    scores = np.full(len(texts), np.nan)
    for i, text in enumerate(texts):
        parsed = _triton(text)
        if parsed is None:
            labels[i] = text
            continue
        scores[i], index, label = parsed
        labels[i] = label if label is not None else classes.label(index)
    return Outputs(classes=labels, confidence=scores)


def _triton(text: str) -> tuple[float, int, str | None] | None:
    """Parse a Triton classification string `"<score>:<index>[:<label>]"`, None if it is not one."""
    parts = text.split(":", 2)
    if len(parts) < 2:
        return None
    try:
        score, index = float(parts[0]), int(parts[1])
    except ValueError:
        return None
    return score, index, parts[2] if len(parts) == 3 else None


def _label_dicts(rows: Sequence[Any], classes: ClassNames) -> Outputs:
    """Rows of `{label: probability}` (TorchServe); uniform rows take the vectorised path."""
    keys = tuple(rows[0]) if rows and isinstance(rows[0], dict) else ()
    uniform = _best_of(_uniform_values(rows, keys), keys)
    return uniform if uniform is not None else _mixed(list(rows), classes)


def _best_of(matrix: Floats | None, keys: tuple[str, ...]) -> Outputs | None:
    """The best label and its probability per row of a rows x labels matrix."""
    if matrix is None:
        return None
    best = np.argmax(np.where(np.isnan(matrix), -np.inf, matrix), axis=1)
    return Outputs(
        classes=np.asarray(keys, dtype=object)[best],
        confidence=np.fmax.reduce(matrix, axis=1),
    )


def _uniform_values(rows: Sequence[Any], keys: tuple[str, ...]) -> Floats | None:
    if not keys or not all(isinstance(row, dict) and len(row) == len(keys) for row in rows):
        return None
    getter = itemgetter(*keys)
    try:
        values = [getter(row) for row in rows]
        matrix = sliced.asarray(values, dtype=np.float64)
    except (KeyError, ValueError, TypeError):
        return None
    return matrix.reshape(len(rows), len(keys))


def _mixed(items: Sequence[Any], classes: ClassNames) -> Outputs:
    """The per-row path for payloads numpy cannot hold as one array (nulls, mixed types)."""
    labels: Labels = np.empty(len(items), dtype=object)
    scores = np.full(len(items), np.nan)
    for i, item in enumerate(items):
        labels[i], scores[i] = _one(item, classes)
    return Outputs(classes=labels, confidence=None if np.isnan(scores).all() else scores)


def _one(item: Any, classes: ClassNames) -> tuple[str | None, float]:
    """Label and confidence (NaN if none) of one row's prediction, whatever its form."""
    if item is None:
        return None, math.nan
    if isinstance(item, dict):
        return _best_item(item, classes)
    if isinstance(item, list):
        if len(item) == 1:  # one row of a [n, 1] column that numpy could not hold as one array
            return _one(item[0], classes)
        row = read_probabilities(item, classes)
        return str(_first(row.classes)), float(_first(row.confidence))
    if isinstance(item, str):
        parsed = _triton(item)
        if parsed is None:
            return item, math.nan
        score, index, label = parsed
        return (label if label is not None else classes.label(index)), score
    if isinstance(item, int | float):
        return str(_number_labels(np.asarray([item]), classes)[0]), math.nan
    msg = f"cannot read a prediction from {type(item).__name__}"
    raise MappingError(msg)


def _first(array: NDArray[Any] | None) -> Any:
    if array is None or not array.size:
        msg = "empty prediction row"
        raise MappingError(msg)
    return array[0]


def _best_item(item: dict[str, Any], classes: ClassNames) -> tuple[str | None, float]:
    numbers = {key: value for key, value in item.items() if isinstance(value, int | float)}
    if numbers and len(numbers) == len(item):
        best, score = max(numbers.items(), key=itemgetter(1))
        return best, float(score)
    if len(item) == 1:  # a one-column DataFrame record, e.g. MLflow's {"prediction": "setosa"}
        return _one(next(iter(item.values())), classes)[0], math.nan
    msg = "a prediction object holds values that are not numbers"
    raise MappingError(msg)
