"""Request bodies for `sidecar loadtest`: rows from a file or the iris generator, drift, and the
body shape of each model-server protocol.

Rows live in memory as a `Table` (at most `MAX_ROWS`; replay cycles through them), so the k-th
request to every target carries the same rows: `--compare` sends identical bodies to both.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import quote

import orjson

from sidecar.extract.presets import PRESETS

__all__ = [
    "MAX_ROWS",
    "SHAPES",
    "Bodies",
    "DataError",
    "Drift",
    "Shape",
    "Table",
    "apply_drifts",
    "generated_table",
    "load_table",
    "parse_drift",
    "request_path",
]

# Replay cycles, so a bounded prefix of a big file is enough; the cap bounds memory (~30 MB per
# numeric column as Python objects).
MAX_ROWS: Final = 200_000
GENERATED_ROWS: Final = 10_000

Row = list[Any]


class DataError(ValueError):
    """A data file or a --drift spec that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Table:
    """Rows in file order; `numeric` names the columns holding only numbers (and nulls)."""

    columns: tuple[str, ...]
    rows: list[Row]
    numeric: frozenset[str]

    def only(self, keep: Sequence[str]) -> Table:
        """The same rows with only the `keep` columns, in table order."""
        index = [self.columns.index(name) for name in keep]
        rows = [[row[i] for i in index] for row in self.rows]
        return Table(tuple(keep), rows, self.numeric & frozenset(keep))

    def std(self, column: str) -> float:
        """Population standard deviation of a numeric column, nulls left out."""
        import numpy as np  # only with --drift ...std: `sidecar --help` stays light

        index = self.columns.index(column)
        values = np.array([row[index] for row in self.rows], dtype=float)  # None -> nan
        return float(np.nanstd(values)) if np.isfinite(values).any() else 0.0


def generated_table(seed: int) -> Table:
    """Iris-like rows from the demo model's generator (a fixed pool, replayed like a file)."""
    from sidecar.demo.model import FEATURES, sample_rows  # the toy model's module pulls in aiohttp

    rows = sample_rows(random.Random(seed), GENERATED_ROWS)
    # The generator yields numpy floats; plain floats serialise (orjson) and print the same.
    return Table(FEATURES, [[float(v) for v in row] for row in rows], frozenset(FEATURES))


def load_table(path: Path) -> Table:
    """Read a CSV file with a header, or JSON Lines of objects (.jsonl, .ndjson, .json)."""
    try:
        with path.open(newline="", encoding="utf-8") as file:
            if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
                columns, rows = _read_jsonl(path, file)
            else:
                columns, rows = _read_csv(path, file)
    except (UnicodeDecodeError, csv.Error) as exc:
        msg = f"{path}: not a UTF-8 CSV or JSON Lines file ({exc})"
        raise DataError(msg) from None
    if not rows:
        msg = f"{path}: no data rows"
        raise DataError(msg)
    return Table(columns, rows, _numeric_columns(columns, rows))


def _read_csv(path: Path, lines: Iterator[str]) -> tuple[tuple[str, ...], list[Row]]:
    reader = csv.reader(lines)
    header = next(reader, None)
    if not header:
        msg = f"{path}: empty file (expected a CSV header line)"
        raise DataError(msg)
    rows = []
    for record in itertools.islice(reader, MAX_ROWS):
        if len(record) != len(header):
            msg = f"{path}:{reader.line_num}: {len(record)} fields, the header has {len(header)}"
            raise DataError(msg)
        rows.append([_cell(text) for text in record])
    return tuple(header), rows


def _cell(text: str) -> Any:
    """A CSV field as the JSON value it looks like: 5 stays an int, 5.0 a float, '' is null."""
    if not text:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _read_jsonl(path: Path, lines: Iterator[str]) -> tuple[tuple[str, ...], list[Row]]:
    columns: tuple[str, ...] = ()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            msg = f"{path}:{number}: not JSON ({exc})"
            raise DataError(msg) from None
        if not isinstance(record, dict):
            msg = f"{path}:{number}: expected a JSON object per line"
            raise DataError(msg)
        # The first object names the columns; later objects may leave some out (null).
        columns = columns or tuple(record)
        rows.append([record.get(name) for name in columns])
        if len(rows) == MAX_ROWS:
            break
    return columns, rows


def _numeric_columns(columns: tuple[str, ...], rows: list[Row]) -> frozenset[str]:
    def numeric(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    return frozenset(
        name
        for i, name in enumerate(columns)
        if all(row[i] is None or numeric(row[i]) for row in rows)
        and any(row[i] is not None for row in rows)
    )


@dataclass(frozen=True, slots=True)
class Drift:
    """`COL=+0.5std` (shift by a share of the std), `COL=+3` (shift), `COL=*1.2` (scale)."""

    column: str
    scale: bool
    amount: float
    in_std: bool
    text: str


_DRIFT: Final = re.compile(
    r"(?P<column>[^=]+)=(?P<op>[-+*])(?P<amount>\d+(?:\.\d*)?(?:e[-+]?\d+)?|\.\d+)(?P<std>std)?"
)


def parse_drift(text: str) -> Drift:
    """Parse one --drift value; DataError says what was expected."""
    match = _DRIFT.fullmatch(text.strip())
    if match is None or (match["op"] == "*" and match["std"]):
        msg = f"invalid --drift value {text!r} (expected COL=+0.5std, COL=-2, or COL=*1.2)"
        raise DataError(msg)
    amount = float(match["amount"]) * (-1.0 if match["op"] == "-" else 1.0)
    return Drift(match["column"], match["op"] == "*", amount, bool(match["std"]), text)


def apply_drifts(table: Table, drifts: Sequence[Drift]) -> tuple[Table, list[str]]:
    """The drifted copy of `table`, and one line per drift saying what it does in data units."""
    changes: list[tuple[int, Callable[[float], float]]] = []
    notes = []
    for drift in drifts:
        if drift.column not in table.numeric:
            kind = "is not numeric" if drift.column in table.columns else "is not in the data"
            msg = f"--drift {drift.text!r}: column {drift.column!r} {kind} (numeric columns: "
            msg += ", ".join(name for name in table.columns if name in table.numeric) + ")"
            raise DataError(msg)
        change, note = _change(drift, table)
        changes.append((table.columns.index(drift.column), change))
        notes.append(note)
    rows = [list(row) for row in table.rows]
    for index, change in changes:
        for row in rows:
            if row[index] is not None:
                row[index] = change(row[index])
    return replace(table, rows=rows), notes


def _change(drift: Drift, table: Table) -> tuple[Callable[[float], float], str]:
    amount = drift.amount
    if drift.scale:
        return (lambda value: value * amount), f"{drift.column} x{amount:g}"
    if drift.in_std:
        std = table.std(drift.column)
        delta = amount * std
        return (
            lambda value: value + delta
        ), f"{drift.column} {delta:+.4g} ({amount:+g} x std {std:.4g})"
    return (lambda value: value + amount), f"{drift.column} {amount:+g}"


@dataclass(frozen=True, slots=True)
class Shape:
    """How one protocol's request body carries rows, and whether it can carry text columns
    (named columns in the body) or numbers only. The path is the preset's first route."""

    body: Callable[[list[Row], tuple[str, ...]], Any]
    strings: bool


def _v2(rows: list[Row], columns: tuple[str, ...]) -> Any:
    # One FP64 tensor [n, k], data flattened row-major as MLServer and Triton send it.
    data = [value for row in rows for value in row]
    tensor = {"name": "input-0", "shape": [len(rows), len(columns)], "datatype": "FP64"}
    return {"inputs": [{**tensor, "data": data}]}


SHAPES: Final[Mapping[str, Shape]] = MappingProxyType(
    {
        "kserve-v1": Shape(lambda r, c: {"instances": r}, False),
        "open-inference-v2": Shape(_v2, False),
        "mlflow": Shape(lambda r, c: {"dataframe_split": {"columns": list(c), "data": r}}, True),
        "torchserve": Shape(lambda r, c: {"instances": r}, False),
        "seldon-v1": Shape(lambda r, c: {"data": {"names": list(c), "ndarray": r}}, True),
    }
)


def request_path(preset: str, model: str) -> str:
    """The inference path of `preset` (its first route, from the registry) for `model`, e.g.
    /v1/models/iris:predict."""
    return PRESETS[preset].routes[0].path.format(model=quote(model, safe=""))


class Bodies:
    """The body of the k-th request to a target: rows k*batch ... k*batch+batch-1, cycling;
    from the drifted table once the run has passed the drift point."""

    def __init__(self, preset: str, table: Table, drifted: Table | None, batch: int) -> None:
        self._encode = SHAPES[preset].body
        self._table, self._drifted = table, drifted or table
        self._batch = batch

    def __call__(self, seq: int, drifted: bool) -> bytes:
        table = self._drifted if drifted else self._table
        rows, start = table.rows, seq * self._batch
        batch = [rows[(start + j) % len(rows)] for j in range(self._batch)]
        return orjson.dumps(self._encode(batch, table.columns))
