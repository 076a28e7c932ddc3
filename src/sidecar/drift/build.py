"""A reference profile built from a training-data file (CSV, Parquet, JSON Lines) of any size:
read in batches with pyarrow (drift/sources.py), typed, and summarised (drift/summary.py). Only
`sidecar profile build` imports this: the serving process never loads pyarrow.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from sidecar.drift.profile import (
    CLASS,
    CONFIDENCE,
    DEFAULT_TOP_K,
    OUTPUT_KINDS,
    VALUE,
    Kind,
    Profile,
    ProfileError,
)
from sidecar.drift.sketches import Float, number_labels
from sidecar.drift.sources import READERS, Format, format_of, progress_bar
from sidecar.drift.summary import (
    Batch,
    CategoricalColumn,
    Column,
    NumericColumn,
    absent,
    build_from_batches,
)

__all__ = ["build"]


def build(
    path: str | os.PathLike[str],
    *,
    categorical: Sequence[str] = (),
    numeric: Sequence[str] = (),
    ignore: Sequence[str] = (),
    top_k: int = DEFAULT_TOP_K,
    class_column: str | None = None,
    confidence_column: str | None = None,
    value_column: str | None = None,
    fmt: Format | None = None,
    progress: bool = True,
) -> Profile:
    """Build a profile from a CSV, Parquet or JSON Lines file of any size.

    Types are inferred from the first batch (numbers -> numeric, text and booleans -> categorical;
    CSV text that parses as numbers -> numeric) and `categorical`/`numeric` override them.
    Columns named as outputs become __class__, __confidence__ and __value__.
    """
    source = Path(path)
    if not source.is_file():
        msg = f"{source}: no such file"
        raise ProfileError(msg)
    kind_of_file = fmt or format_of(source)
    reader = READERS[kind_of_file]
    peek = reader(source, None)
    try:
        first = next(peek, None)
    finally:
        peek.close()  # releases the file now, not at garbage collection
    if first is None:
        msg = f"{source}: no rows"
        raise ProfileError(msg)
    roles = _roles(
        first[1],
        kind_of_file == "csv",
        categorical,
        numeric,
        ignore,
        {CLASS: class_column, CONFIDENCE: confidence_column, VALUE: value_column},
    )
    passes = iter(("pass 1/2", "pass 2/2"))

    def batches() -> Iterator[Batch]:
        bar = progress_bar(source, next(passes, "pass"), progress)
        with bar:
            for n, arrays in reader(source, bar):
                yield (
                    n,
                    {
                        name: _convert(arrays.get(column), kind, n)
                        for name, (column, kind) in roles.items()
                    },
                )

    features = [(name, kind) for name, (_, kind) in roles.items() if name not in OUTPUT_KINDS]
    outputs = [(name, kind) for name, (_, kind) in roles.items() if name in OUTPUT_KINDS]
    return build_from_batches(batches, features, outputs, top_k=top_k, source=source.name)


def _roles(
    first: Mapping[str, pa.Array],
    untyped: bool,
    categorical: Sequence[str],
    numeric: Sequence[str],
    ignore: Sequence[str],
    outputs: Mapping[str, str | None],
) -> dict[str, tuple[str, Kind]]:
    """Profile name -> (data column, kind), features first in file order, then outputs."""
    named = [*categorical, *numeric, *ignore, *(c for c in outputs.values() if c)]
    unknown = [c for c in named if c not in first]
    if unknown:
        msg = f"no column named {', '.join(map(repr, unknown))}; the columns are {', '.join(first)}"
        raise ProfileError(msg)
    both = set(categorical) & set(numeric)
    if both:
        msg = f"columns declared both categorical and numeric: {', '.join(sorted(both))}"
        raise ProfileError(msg)
    taken = set(ignore) | {c for c in outputs.values() if c}
    roles: dict[str, tuple[str, Kind]] = {}
    for column, array in first.items():
        if column in taken:
            continue
        if column in OUTPUT_KINDS:
            msg = f"column {column!r} uses a name reserved for outputs; pass it with --ignore"
            raise ProfileError(msg)
        kind: Kind = (
            "categorical"
            if column in categorical
            else "numeric"
            if column in numeric
            else _infer(array, untyped)
        )
        roles[column] = (column, kind)
    for name, output_column in outputs.items():
        if output_column:
            roles[name] = (output_column, OUTPUT_KINDS[name])
    return roles


def _infer(array: pa.Array, untyped: bool) -> Kind:
    t = array.type
    if _is_number(t) or pa.types.is_null(t):
        return "numeric"
    if untyped and (pa.types.is_string(t) or pa.types.is_large_string(t)):
        present = pc.drop_null(array)
        if len(present) and pc.all(_looks_numeric(present)).as_py():
            return "numeric"
    return "categorical"


# --- arrow -> normalised columns ----------------------------------------------------------------

_NUMBER = r"^[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|Inf|INF|infinity|Infinity|nan|NaN|NAN)$"


def _is_number(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))


def _looks_numeric(strings: Any) -> Any:
    return pc.match_substring_regex(pc.utf8_trim_whitespace(strings), _NUMBER)


def _convert(array: Any, kind: Kind, rows: int) -> Column:
    if array is None:
        return absent(kind, rows)
    missing = np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if kind == "numeric":
        return NumericColumn(_numbers(array, missing), missing)
    return CategoricalColumn(_labels(array), missing)


def _numbers(array: Any, missing: NDArray[np.bool_]) -> Float:
    t = array.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        trimmed = pc.utf8_trim_whitespace(array)
        array = pc.if_else(_looks_numeric(trimmed), trimmed, None)  # not a number -> `nan` bin
    elif not (_is_number(t) or pa.types.is_boolean(t)):
        return np.full(len(array), np.nan)  # lists, structs, nulls: never numbers
    values = np.array(pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    values[missing] = np.nan
    return values


def _labels(array: Any) -> NDArray[np.str_]:
    if _is_number(array.type):
        values = np.asarray(
            pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64
        )
        return number_labels(values)
    if pa.types.is_boolean(array.type):
        return np.where(
            np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False)), "true", "false"
        )
    try:
        text = pc.cast(array, pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # lists, structs: their JSON text
        text = pa.array(
            [None if v is None else msgspec.json.encode(v).decode() for v in array.to_pylist()],
            pa.string(),
        )
    return np.asarray(pc.fill_null(text, "").to_numpy(zero_copy_only=False)).astype(str)
