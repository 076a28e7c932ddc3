"""Feature tables from the layouts model servers accept: rows, a row, columns, records, tensors.

Every builder tries one `np.asarray` over the whole payload first. Only when that fails (a null, a
string, a boolean, a ragged row) does it classify cells one by one, and then only in the columns
that need it: a single categorical column does not slow the numeric ones down.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from operator import itemgetter
from typing import Any, Final

import numpy as np
import orjson
from numpy.typing import NDArray

from sidecar.extract import sliced
from sidecar.extract.errors import MappingError
from sidecar.extract.types import FeatureTable

__all__ = [
    "MAX_COLUMNS",
    "Block",
    "columns_table",
    "join",
    "records_table",
    "rows_block",
    "table_from_value",
    "tensor_block",
]

# A tensor shape can claim any width; past this many columns it is not a feature table any more.
MAX_COLUMNS: Final = 100_000

_NUMBER_KINDS: Final = frozenset("iuf")


class _Absent:
    """A cell that a ragged row or a sparse record does not have (JSON cannot spell it)."""

    __slots__ = ()


_ABSENT: Final = _Absent()

Names = Sequence[Any] | None
Floats = NDArray[np.float64]
Flags = NDArray[np.bool_]
Texts = NDArray[np.object_]


@dataclass(frozen=True, slots=True)
class Block:
    """A feature table before it has column names; `strings` is keyed by column position."""

    numeric: Floats
    missing: Flags
    non_numeric: Flags
    strings: Mapping[int, Texts]

    @classmethod
    def dense(cls, numeric: Floats) -> Block:
        """A block whose every cell is a number."""
        return cls(numeric, np.zeros(numeric.shape, bool), np.zeros(numeric.shape, bool), {})

    @property
    def width(self) -> int:
        return int(self.numeric.shape[1])

    def named(self, names: Names) -> FeatureTable:
        """The table with payload or config names, position numbers ("0", "1", ...) for the rest."""
        block = self
        if self.numeric.shape[0] == 0 and names and self.width < len(names):
            block = Block.dense(np.zeros((0, len(names))))
        columns = _column_names(block.width, names)
        strings = {columns[j]: texts for j, texts in block.strings.items()}
        return FeatureTable(columns, block.numeric, block.missing, block.non_numeric, strings)


def table_from_value(value: Any, names: Names, *, check_booleans: bool) -> FeatureTable:
    """A table from any common layout: rows, one flat row, records, a dict of columns, a scalar."""
    if isinstance(value, dict):
        return columns_table(value, check_booleans=check_booleans)
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            return records_table(value, check_booleans=check_booleans)
        return rows_block(value, check_booleans=check_booleans).named(names)
    if value is None:
        msg = "no features at the mapped place"
        raise MappingError(msg)
    return rows_block([value], check_booleans=check_booleans).named(names)


def rows_block(rows: Sequence[Any], *, check_booleans: bool) -> Block:
    """Row-major data (`[[...], [...]]`); a list of scalars is one row."""
    if not rows:
        return Block.dense(np.zeros((0, 0)))
    numeric = _numbers(rows, check_booleans=check_booleans)
    if numeric is not None:
        return Block.dense(numeric.reshape(1, -1) if numeric.ndim == 1 else _as_2d(numeric))
    if not any(isinstance(row, list | tuple) for row in rows):
        return _cellwise([rows], check_booleans=check_booleans)
    return _cellwise(
        [row if isinstance(row, list | tuple) else (row,) for row in rows],
        check_booleans=check_booleans,
    )


def records_table(records: Sequence[Any], *, check_booleans: bool) -> FeatureTable:
    """Records (`[{"col": v}, ...]`): columns are the keys, in first-seen order."""
    if not all(isinstance(record, dict) for record in records):
        msg = "a list of records holds something that is not an object"
        raise MappingError(msg)
    keys = tuple(records[0])
    rows = _uniform_records(records, keys)
    if rows is None:
        # Records with differing keys: the union of keys, absent cells marked missing.
        keys = tuple(dict.fromkeys(key for record in records for key in record))
        rows = [tuple(record.get(key, _ABSENT) for key in keys) for record in records]
    if not keys:
        return Block.dense(np.zeros((len(records), 0))).named(None)
    return rows_block(rows, check_booleans=check_booleans).named(keys)


def columns_table(columns: Mapping[str, Any], *, check_booleans: bool) -> FeatureTable:
    """A dict of columns (`{"col": [v1, v2]}`); a scalar value is a column of one."""
    names = tuple(columns)
    cells = [value if isinstance(value, list) else [value] for value in columns.values()]
    lengths = {len(column) for column in cells}
    if len(lengths) == 1:
        numeric = _numbers(cells, check_booleans=check_booleans)
        if numeric is not None and numeric.ndim == 2:
            return Block.dense(np.ascontiguousarray(numeric.T)).named(names)
    n = max(lengths, default=0)
    padded = [column + [_ABSENT] * (n - len(column)) for column in cells]
    return _from_columns(padded, n, check_booleans=check_booleans).named(names)


def tensor_block(data: Any, shape: Any, *, check_booleans: bool) -> Block:
    """A tensor (V2 `data` + `shape`, Seldon `tensor`), nested or flat, as rows x columns."""
    if shape is None:
        return rows_block(data if isinstance(data, list) else [data], check_booleans=check_booleans)
    dims = _dims(shape)
    n = dims[0] if dims else 1
    width = math.prod(dims[1:])
    numeric = _numbers(data, check_booleans=check_booleans)
    if numeric is not None:
        if numeric.size != n * width:
            msg = f"tensor data has {numeric.size} values, shape {list(dims)} needs {n * width}"
            raise MappingError(msg)
        return Block.dense(numeric.reshape(n, width))
    flat = _flatten(data)
    if len(flat) != n * width:
        msg = f"tensor data has {len(flat)} values, shape {list(dims)} needs {n * width}"
        raise MappingError(msg)
    rows = [flat[i * width : (i + 1) * width] for i in range(n)]
    if width == 0:
        return Block.dense(np.zeros((n, 0)))
    return _cellwise(rows, check_booleans=check_booleans)


def join(blocks: Sequence[Block]) -> Block:
    """Blocks side by side (several V2 inputs): the row counts must agree."""
    if len({block.numeric.shape[0] for block in blocks}) > 1:
        msg = "inputs have different row counts"
        raise MappingError(msg)
    strings: dict[int, Texts] = {}
    offset = 0
    for block in blocks:
        strings.update({offset + j: texts for j, texts in block.strings.items()})
        offset += block.width
    return Block(
        np.hstack([block.numeric for block in blocks]),
        np.hstack([block.missing for block in blocks]),
        np.hstack([block.non_numeric for block in blocks]),
        strings,
    )


def _numbers(values: Any, *, check_booleans: bool) -> Floats | None:
    """`values` as one float array if every leaf is a JSON number, else None. The fast path."""
    if not _numeric_ends(values):
        return None
    try:
        array = sliced.asarray(values)
    except (ValueError, TypeError, RecursionError):  # ragged, or deeper than numpy's 64 dims
        return None
    # Nulls and mixed cells give dtype object, strings give a unicode dtype, all-booleans give bool.
    if array.dtype.kind not in _NUMBER_KINDS:
        return None
    if check_booleans and array.ndim and _holds_booleans(array, values):
        return None
    return array.astype(np.float64, copy=False)


def _numeric_ends(values: Any) -> bool:
    """Whether the first and last rows (or cells) are all numbers: a cheap probe before numpy.

    numpy turns a table with one string column into a unicode array, formatting every number as
    text on the way (~15x slower than reading numbers); a categorical column almost always shows
    in the first or last row, so probing them skips that cost.
    """
    if not isinstance(values, list | tuple) or not values:
        return True
    for row in (values[0], values[-1]):
        if isinstance(row, list | tuple):
            try:
                if row and np.asarray(row).dtype.kind not in _NUMBER_KINDS:
                    return False
            except (ValueError, TypeError, RecursionError):
                return False
        elif type(row) is not float and type(row) is not int:
            return False
    return True


def _holds_booleans(array: NDArray[Any], values: Any) -> bool:
    """Whether any 0/1 cell of `array` was a JSON boolean (numpy reads true as 1, false as 0)."""
    for index in np.argwhere((array == 0) | (array == 1)):
        cell = values
        for position in index:
            cell = cell[position]
        if type(cell) is bool:
            return True
    return False


def _as_2d(numeric: Floats) -> Floats:
    if numeric.ndim == 0:
        return numeric.reshape(1, 1)
    return numeric.reshape(numeric.shape[0], -1)


def _uniform_records(records: Sequence[dict[str, Any]], keys: tuple[str, ...]) -> list[Any] | None:
    """Rows of values in `keys` order when every record has exactly those keys, else None."""
    if not keys or not all(len(record) == len(keys) for record in records):
        return None
    getter = itemgetter(*keys)
    try:
        values = [getter(record) for record in records]
    except KeyError:
        return None
    return [(value,) for value in values] if len(keys) == 1 else values


def _cellwise(rows: Sequence[Sequence[Any]], *, check_booleans: bool) -> Block:
    """The slow path for rows: transpose (ragged rows padded with absent cells), then per column."""
    columns = list(zip_longest(*rows, fillvalue=_ABSENT))
    return _from_columns(columns, len(rows), check_booleans=check_booleans)


def _from_columns(columns: Sequence[Sequence[Any]], n: int, *, check_booleans: bool) -> Block:
    numeric = np.full((n, len(columns)), np.nan)
    missing = np.zeros((n, len(columns)), bool)
    non_numeric = np.zeros((n, len(columns)), bool)
    strings: dict[int, Texts] = {}
    for j, cells in enumerate(columns):
        fast = _numbers(cells, check_booleans=check_booleans)
        if fast is not None and fast.ndim == 1:
            numeric[:, j] = fast
            continue
        texts = _classify(cells, numeric[:, j], missing[:, j], non_numeric[:, j])
        if texts is not None:
            strings[j] = texts
    return Block(numeric, missing, non_numeric, strings)


def _classify(cells: Sequence[Any], numeric: Floats, missing: Flags, bad: Flags) -> Texts | None:
    """Sort one column's cells into numbers, missing and non-numeric, writing into the views."""
    texts: Texts | None = None
    for i, cell in enumerate(cells):
        kind = type(cell)
        if kind is float or kind is int:
            numeric[i] = _to_float(cell)
        elif cell is None or cell is _ABSENT:
            missing[i] = True
        else:
            bad[i] = True
            if texts is None:
                texts = np.full(len(cells), None, dtype=object)
            texts[i] = _text(cell)
    return texts


def _to_float(number: int | float) -> float:
    # int | float, not float: compiled (setup.py), a float parameter would convert at the call,
    # outside this try.
    try:
        return float(number)
    except OverflowError:  # a JSON integer beyond the range of a double
        return math.inf if number > 0 else -math.inf


def _text(cell: Any) -> str:
    if isinstance(cell, str):
        return cell
    if isinstance(cell, bool):
        return "true" if cell else "false"
    try:
        return orjson.dumps(cell).decode()
    except (TypeError, orjson.JSONEncodeError):  # nesting beyond orjson's limit
        return type(cell).__name__


def _dims(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        msg = f"tensor shape {shape!r} is not a list of non-negative integers"
        raise MappingError(msg)
    if math.prod(shape[1:]) > MAX_COLUMNS:
        msg = f"tensor shape {shape!r} has more than {MAX_COLUMNS} columns per row"
        raise MappingError(msg)
    return tuple(shape)


def _flatten(data: Any) -> list[Any]:
    """Nested lists flattened in row-major order, without recursion (the input may be deep)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _column_names(width: int, names: Names) -> tuple[str, ...]:
    given = names or ()
    return tuple(str(given[j]) if j < len(given) else str(j) for j in range(width))
