"""Drift counting: the rows of each batch into a reference's bins, and the windows they add up in.

A reference profile becomes per-feature specs once (search points, PIT table, category codes,
what the noise floors need); each batch is then counted into one flat array per side (inputs or
outputs) that adds and subtracts in place, so totals and the in-process window (and its recent
part) cost a few numpy adds per batch. The input adapters that turn extraction results into
columns, and pool small batches, live here too. Scores and export are recorder.py's.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

from sidecar.drift import profile as profiles
from sidecar.drift import sketches as sk
from sidecar.drift.floors import PsiFloors, wasserstein_spread
from sidecar.extract.types import FeatureTable, Outputs

__all__ = [
    "RECENT_SLOTS",
    "WINDOW_SLOTS",
    "Counts",
    "Group",
    "Numeric",
    "Raw",
    "Spec",
    "concat_outputs",
    "concat_tables",
    "output_raws",
    "output_rows",
    "table_raws",
]

WINDOW_SLOTS = 10  # the in-process window moves in tenths of its size
# The short window: the window's last two slots (between a tenth and a fifth of it). A change
# fills it long before it is a large part of the whole window, so it is seen at full size soon.
RECENT_SLOTS = 2


# --- per-feature specs, decided once ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Numeric:
    name: str
    bins: int
    points: sk.Float
    pit: sk.PitTable
    lo: float
    hi: float
    quantiles: sk.Float  # reference x at each of sk.CDF_LEVELS
    scale: float  # reference std, so Wasserstein reads in standard deviations
    reference: sk.Float
    labels: tuple[str, ...]
    rows: int
    numbers: int
    spread: float  # the Wasserstein floor's mean term (floors.wasserstein_spread)
    psi_floors: PsiFloors

    @property
    def size(self) -> int:
        return self.bins + 4


@dataclass(frozen=True, slots=True)
class _Categorical:
    name: str
    cats: sk.Categories
    reference: sk.Float
    labels: tuple[str, ...]
    rows: int
    psi_floors: PsiFloors

    @property
    def size(self) -> int:
        return self.cats.size + 2


Spec = Numeric | _Categorical


def _spec(feature: profiles.Feature) -> Spec:
    reference = np.fromiter(feature.fractions.values(), dtype=np.float64)
    labels = tuple(feature.fractions)
    rows = max(feature.count, 1)
    if isinstance(feature, profiles.CategoricalFeature):
        return _Categorical(
            feature.name,
            sk.categories(feature.values),
            reference,
            labels,
            rows,
            PsiFloors(reference, rows),
        )
    edges = np.asarray(feature.edges, dtype=np.float64)
    cdf = sk.make_cdf(
        *(
            np.asarray(v, dtype=np.float64)
            for v in (feature.cdf_x, feature.cdf_below, feature.cdf_at)
        )
    )
    quantiles = _quantiles(cdf)
    scale = feature.std or 1.0
    return Numeric(
        name=feature.name,
        bins=max(edges.size - 1, 0),
        points=sk.search_points(edges),
        pit=sk.make_pit_table(cdf),
        lo=float(edges[0]) if edges.size else math.nan,
        hi=float(edges[-1]) if edges.size else math.nan,
        quantiles=quantiles,
        scale=scale,
        reference=reference,
        labels=labels,
        rows=rows,
        numbers=max(feature.count - feature.missing - feature.nan, 1),
        spread=wasserstein_spread(quantiles, scale),
        psi_floors=PsiFloors(reference, rows),
    )


def _quantiles(cdf: sk.Cdf) -> sk.Float:
    """Invert the reference CDF at CDF_LEVELS (atoms make it flat in x, gaps flat in u)."""
    if cdf.x.size == 0:
        return np.zeros(sk.CDF_LEVELS.size)
    levels = np.column_stack((cdf.below, cdf.at)).ravel()
    return np.asarray(np.interp(sk.CDF_LEVELS, levels, np.repeat(cdf.x, 2)), dtype=np.float64)


# --- counts, windows, groups --------------------------------------------------------------------


@dataclass(slots=True)
class Counts:
    """Everything one batch (or a window, or all time) adds up to, for one group of features."""

    rows: int
    bins: NDArray[np.int64]  # every feature's layout, back to back
    cells: NDArray[np.int64]  # PIT_CELLS per numeric feature, back to back
    pit_sum: sk.Float  # sum of u per numeric feature (values inside the range)
    tails: sk.Float  # per numeric feature: sum of (lo - x) below, (x - hi) above

    def add(self, other: Counts, sign: int = 1) -> None:
        self.rows += sign * other.rows
        self.bins += sign * other.bins
        self.cells += sign * other.cells
        self.pit_sum += sign * other.pit_sum
        self.tails += sign * other.tails

    def copy(self) -> Counts:
        return Counts(
            self.rows, self.bins.copy(), self.cells.copy(), self.pit_sum.copy(), self.tails.copy()
        )


class _Window:
    """The last `length` rows (or seconds), kept as WINDOW_SLOTS slots and a running total."""

    def __init__(self, kind: Literal["count", "time"], length: float, empty: Counts) -> None:
        self._kind, self._length, self._step = kind, length, length / WINDOW_SLOTS
        self._slots: deque[tuple[float, Counts]] = deque()
        self.total = empty

    def add(self, counts: Counts, now: float) -> None:
        key = 0.0 if self._kind == "count" else now // self._step
        last = self._slots[-1] if self._slots else None
        if last is not None and (
            last[1].rows < self._step if self._kind == "count" else last[0] == key
        ):
            last[1].add(counts)
        else:
            self._slots.append((key, counts.copy()))
        self.total.add(counts)
        self._expire(now)

    def snapshot(self, now: float) -> Counts:
        self._expire(now)
        return self.total.copy()

    def recent(self, now: float) -> Counts:
        """The short window: what the last RECENT_SLOTS slots hold."""
        self._expire(now)
        slots = list(self._slots)[-RECENT_SLOTS:]
        if not slots:
            return self.total.copy()  # empty
        recent = slots[0][1].copy()
        for _, counts in slots[1:]:
            recent.add(counts)
        return recent

    def _expire(self, now: float) -> None:
        if self._kind == "count":
            # Keep at least `length` rows: drop the oldest slot only if the rest still has them.
            while len(self._slots) > 1 and self.total.rows - self._slots[0][1].rows >= self._length:
                self.total.add(self._slots.popleft()[1], -1)
        else:
            oldest = now // self._step - WINDOW_SLOTS
            while self._slots and self._slots[0][0] <= oldest:
                self.total.add(self._slots.popleft()[1], -1)


class Raw(NamedTuple):
    """One column of one batch as extraction gave it: numbers, missing cells, and text cells."""

    values: sk.Float
    missing: NDArray[np.bool_]
    text: NDArray[np.object_] | None = None
    is_text: NDArray[np.bool_] | None = None
    has_nan: bool = True  # False lets numeric columns skip the NaN bookkeeping


class Group:
    """The features of one side (inputs or outputs): specs, layout offsets, totals, window."""

    def __init__(
        self, features: Sequence[profiles.Feature], kind: Literal["count", "time"], length: float
    ) -> None:
        self.specs = [_spec(f) for f in features]
        self.offsets = np.cumsum([0, *(s.size for s in self.specs)])
        numeric = [i for i, s in enumerate(self.specs) if isinstance(s, Numeric)]
        self.numeric_slot = {i: k for k, i in enumerate(numeric)}
        self.total = self.empty()
        self.window = _Window(kind, length, self.empty())
        self._layouts: dict[tuple[str, ...], list[int | None]] = {}

    def empty(self) -> Counts:
        n = len(self.numeric_slot)
        return Counts(
            0,
            np.zeros(int(self.offsets[-1]), dtype=np.int64),
            np.zeros(n * sk.PIT_CELLS, dtype=np.int64),
            np.zeros(n),
            np.zeros((n, 2)),
        )

    def layout(self, columns: tuple[str, ...]) -> list[int | None]:
        """For each spec, the index of its column in a table with these columns (None: absent).
        Columns "0", "1", ... (a payload without names) are the profile's columns in order."""
        found = self._layouts.get(columns)
        if found is None:
            if columns == tuple(str(i) for i in range(len(columns))):
                found = [i if i < len(columns) else None for i in range(len(self.specs))]
            else:
                where = {name: j for j, name in enumerate(columns)}
                found = [where.get(s.name) for s in self.specs]
            if len(self._layouts) < 64:  # payload shapes are few; bound the cache anyway
                self._layouts[columns] = found
        return found

    def encode(self, raws: Sequence[Raw | None], rows: int, rng: np.random.Generator) -> Counts:
        """Count one batch: per numeric column one sort and a few searches, per categorical
        column one lookup per value and a bincount."""
        counts = self.empty()
        counts.rows = rows
        for i, (spec, raw) in enumerate(zip(self.specs, raws, strict=True)):
            view = counts.bins[int(self.offsets[i]) : int(self.offsets[i + 1])]
            if raw is None:  # column absent from this payload: every row is missing
                view[-2 if isinstance(spec, Numeric) else -1] = rows
            elif isinstance(spec, _Categorical):
                view += np.bincount(_categorical(spec, raw), minlength=spec.size)
            else:
                _numeric(spec, raw, view, counts, self.numeric_slot[i], rng)
        return counts


def _numeric(
    spec: Numeric,
    raw: Raw,
    view: NDArray[np.int64],
    counts: Counts,
    k: int,
    rng: np.random.Generator,
) -> None:
    """Fill one numeric feature's bins (`view`), PIT cells, PIT sum and tails."""
    x = raw.values
    if raw.has_nan:
        bad = np.isnan(x)
        view[-2] = np.count_nonzero(raw.missing)
        view[-1] = np.count_nonzero(bad) - view[-2]
        x = x[~bad]
    ordered = np.sort(x)
    view[:-2] = sk.bin_counts(ordered, spec.points)
    cells = counts.cells[k * sk.PIT_CELLS : (k + 1) * sk.PIT_CELLS]
    cells[:] = sk.pit_counts(ordered, spec.pit, rng)
    below, above = int(view[0]), int(view[-3])
    counts.pit_sum[k] = sk.pit_sum(cells, below, above)
    if below or above:  # rare: values beyond the reference's range; sorted, they sit at the ends
        low, high = ordered[:below], ordered[ordered.size - above :]
        low, high = low[np.isfinite(low)], high[np.isfinite(high)]
        counts.tails[k] = (float(np.sum(spec.lo - low)), float(np.sum(high - spec.hi)))


def _categorical(spec: _Categorical, raw: Raw) -> NDArray[np.intp]:
    codes = np.full(raw.values.shape, spec.cats.size, dtype=np.intp)
    numbers = ~raw.missing & ~np.isnan(raw.values)
    if numbers.any():
        codes[numbers] = sk.number_codes(raw.values[numbers], spec.cats)
    if raw.text is not None and raw.is_text is not None and raw.is_text.any():
        codes[raw.is_text] = sk.categorical_codes(raw.text, spec.cats)[raw.is_text]
    codes[raw.missing] = spec.cats.size + 1
    return codes


# --- payload -> raw columns ---------------------------------------------------------------------


def table_raws(table: FeatureTable) -> list[Raw]:
    """Every column of the table, numbers copied once into feature-major (contiguous) order."""
    values = np.ascontiguousarray(table.numeric.T)
    nan_columns: list[bool] = np.asarray(np.isnan(values).any(axis=1)).tolist()
    return [
        Raw(
            values[j],
            table.missing[:, j],
            table.strings.get(name),
            table.non_numeric[:, j],
            nan_columns[j],
        )
        for j, name in enumerate(table.columns)
    ]


def output_raws(outputs: Outputs) -> dict[str, Raw]:
    raws: dict[str, Raw] = {}
    for name, values in (
        (profiles.CONFIDENCE, outputs.confidence),
        (profiles.VALUE, outputs.value),
    ):
        if values is not None:
            numbers = np.asarray(values, dtype=np.float64)
            raws[name] = Raw(numbers, np.isnan(numbers))
    if outputs.classes is not None:
        classes = np.asarray(outputs.classes)
        if classes.dtype.kind in "iufb":
            numbers = classes.astype(np.float64)
            raws[profiles.CLASS] = Raw(numbers, np.isnan(numbers))
        else:
            missing = np.equal(classes, None)  # type: ignore[call-overload]
            raws[profiles.CLASS] = Raw(
                np.full(classes.size, np.nan), missing, classes.astype(object), ~missing
            )
    return raws


def output_rows(outputs: Outputs) -> int:
    for array in (outputs.classes, outputs.confidence, outputs.value):
        if array is not None:
            return int(array.size)
    return 0


def concat_tables(tables: Sequence[FeatureTable]) -> Iterator[FeatureTable]:
    """Pooled tables as few tables as possible: one per distinct column layout."""
    by_columns: dict[tuple[str, ...], list[FeatureTable]] = {}
    for table in tables:
        by_columns.setdefault(table.columns, []).append(table)
    for columns, group in by_columns.items():
        if len(group) == 1:
            yield group[0]
            continue
        names = {name for table in group for name in table.strings}
        yield FeatureTable(
            columns,
            np.concatenate([t.numeric for t in group]),
            np.concatenate([t.missing for t in group]),
            np.concatenate([t.non_numeric for t in group]),
            {name: np.concatenate([_strings(t, name) for t in group]) for name in names},
        )


def _strings(table: FeatureTable, name: str) -> NDArray[np.object_]:
    found = table.strings.get(name)
    return found if found is not None else np.full(table.n_rows, None, dtype=object)


def concat_outputs(batches: Sequence[Outputs]) -> Iterator[Outputs]:
    """Pooled outputs joined per combination of present fields (classes, confidence, value)."""
    by_shape: dict[tuple[bool, bool, bool], list[Outputs]] = {}
    for batch in batches:
        shape = (batch.classes is not None, batch.confidence is not None, batch.value is not None)
        by_shape.setdefault(shape, []).append(batch)
    for (classes, confidence, value), group in by_shape.items():
        if len(group) == 1:
            yield group[0]
            continue
        yield Outputs(
            np.concatenate([b.classes for b in group if b.classes is not None])
            if classes
            else None,
            np.concatenate([b.confidence for b in group if b.confidence is not None])
            if confidence
            else None,
            np.concatenate([b.value for b in group if b.value is not None]) if value else None,
        )
