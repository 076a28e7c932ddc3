"""Columns of data summarised into profile features, in two passes.

Pass 1 streams every batch once and keeps, per column, counts, moments, the exact range, a bottom-k
random sample (a uniform sample that merges across batches) and up to B+1 distinct values; per
categorical column a Misra-Gries summary of the frequent values. The sample only places the bin
edges and CDF knots; pass 2 then counts every row against them, so every fraction and every CDF
value in the profile is exact. Memory is bounded by columns x sample size, never by rows, so a file
larger than memory works. numpy only: the serving process summarises live windows with it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from sidecar.drift.profile import (
    DEFAULT_TOP_K,
    MAX_TOP_K,
    CategoricalFeature,
    Kind,
    NumericFeature,
    Profile,
    ProfileError,
)
from sidecar.drift.sketches import (
    CDF_LEVELS,
    N_BINS,
    Float,
    categorical_codes,
    categorical_labels,
    categories,
    equal_mass_edges,
    numeric_codes,
    numeric_labels,
    search_points,
)

__all__ = [
    "SAMPLE_SIZE",
    "SUMMARY_SIZE",
    "Batch",
    "CategoricalColumn",
    "Column",
    "NumericColumn",
    "absent",
    "build_from_batches",
]

SAMPLE_SIZE = 20_000  # per numeric column; places edges to about +-0.4% of mass
SUMMARY_SIZE = 20 * MAX_TOP_K  # frequent-value candidates kept per categorical column in pass 1


# --- normalised columns -------------------------------------------------------------------------


class NumericColumn(NamedTuple):
    """One batch of a numeric column. `values` is NaN wherever `missing` is true."""

    values: Float
    missing: NDArray[np.bool_]


class CategoricalColumn(NamedTuple):
    """One batch of a categorical column as canonical labels (see sketches.number_labels)."""

    labels: NDArray[np.str_]
    missing: NDArray[np.bool_]


Column = NumericColumn | CategoricalColumn
Batch = tuple[int, Mapping[str, Column]]  # rows, columns (an absent column means all missing)


def absent(kind: Kind, rows: int) -> Column:
    if kind == "numeric":
        return NumericColumn(np.full(rows, np.nan), np.ones(rows, dtype=bool))
    return CategoricalColumn(np.full(rows, "", dtype=str), np.ones(rows, dtype=bool))


# --- pass 1 and pass 2 --------------------------------------------------------------------------


class _NumericStats:
    """Pass 1 for a numeric column: counts, Chan's running moments, range, sample, distinct."""

    def __init__(self, sample_size: int, n_bins: int) -> None:
        self.rows = self.missing = self.nan = self.finite = 0
        self.mean = self.m2 = 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.keys, self.sample = np.empty(0), np.empty(0)
        self.distinct: Float | None = np.empty(0)  # None once there are more than n_bins
        self._size, self._bins = sample_size, n_bins

    def add(self, column: NumericColumn, keys: Float) -> None:
        x, missing = column.values, column.missing
        self.rows += x.size
        self.missing += int(np.count_nonzero(missing))
        self.nan += int(np.count_nonzero(np.isnan(x) & ~missing))
        ok = np.isfinite(x)
        values = x[ok]
        if values.size == 0:
            return
        self._moments(values)
        self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))
        self._keep(values, keys[ok])
        if self.distinct is not None:
            self.distinct = np.union1d(self.distinct, values)
            if self.distinct.size > self._bins:
                self.distinct = None

    def _moments(self, values: Float) -> None:
        n, mean = values.size, float(values.mean())
        total = self.finite + n
        delta = mean - self.mean
        self.m2 += float(((values - mean) ** 2).sum()) + delta * delta * self.finite * n / total
        self.mean += delta * n / total
        self.finite = total

    def _keep(self, values: Float, keys: Float) -> None:
        # Bottom-k by random key: a uniform sample of everything seen, whatever the batch sizes.
        keys, values = np.concatenate((self.keys, keys)), np.concatenate((self.sample, values))
        if keys.size > self._size:
            keep = np.argpartition(keys, self._size - 1)[: self._size]
            keys, values = keys[keep], values[keep]
        self.keys, self.sample = keys, values

    def edges_and_knots(self) -> tuple[Float, Float]:
        if self.finite == 0:
            return np.empty(0), np.empty(0)
        if self.distinct is not None:
            return equal_mass_edges(
                self.distinct, self.lo, self.hi, self._bins, discrete=self.distinct
            ), self.distinct
        sample = np.sort(self.sample)
        edges = equal_mass_edges(sample, self.lo, self.hi, self._bins)
        knots = np.quantile(sample, CDF_LEVELS)
        knots[0], knots[-1] = self.lo, self.hi
        return edges, np.unique(knots)


class _NumericCounts:
    """Pass 2 for a numeric column: exact bin counts and exact CDF values at the knots."""

    def __init__(self, stats: _NumericStats) -> None:
        self.stats = stats
        self.edges, self.knots = stats.edges_and_knots()
        self.points = search_points(self.edges)
        self.bins = np.zeros(max(self.edges.size - 1, 0) + 4, dtype=np.int64)
        self.below = np.zeros(self.knots.size + 1, dtype=np.int64)
        self.at = np.zeros(self.knots.size + 1, dtype=np.int64)

    def add(self, column: NumericColumn) -> None:
        x = column.values
        codes = numeric_codes(x, column.missing, self.points)
        self.bins += np.bincount(codes, minlength=self.bins.size)
        numbers = x[~np.isnan(x) & ~column.missing]
        # searchsorted 'right' = knots <= v, so v < knot j iff that index <= j (and 'left' for <=).
        self.below += np.bincount(
            np.searchsorted(self.knots, numbers, "right"), minlength=self.below.size
        )
        self.at += np.bincount(np.searchsorted(self.knots, numbers, "left"), minlength=self.at.size)

    def feature(self, name: str) -> NumericFeature:
        s = self.stats
        numbers = max(s.rows - s.missing - s.nan, 1)
        std = math.sqrt(s.m2 / s.finite) if s.finite else None
        labels = numeric_labels(max(self.edges.size - 1, 0))
        return NumericFeature(
            name=name,
            count=s.rows,
            missing=s.missing,
            nan=s.nan,
            mean=_round(s.mean) if s.finite else None,
            std=_round(std),
            min=s.lo if s.finite else None,
            max=s.hi if s.finite else None,
            edges=self.edges.tolist(),
            fractions=_fractions(labels, self.bins, s.rows),
            cdf_x=self.knots.tolist(),
            cdf_below=(np.cumsum(self.below)[:-1] / numbers).tolist(),
            cdf_at=(np.cumsum(self.at)[:-1] / numbers).tolist(),
        )


class _CategoricalStats:
    """Pass 1 for a categorical column: a Misra-Gries summary, which keeps every value whose share
    exceeds 1/(capacity+1), so the true top-K are among its candidates."""

    def __init__(self, capacity: int) -> None:
        self.rows = self.missing = 0
        self.counts: dict[str, int] = {}
        self._capacity = capacity

    def add(self, column: CategoricalColumn) -> None:
        self.rows += column.labels.size
        self.missing += int(np.count_nonzero(column.missing))
        values, counts = np.unique(column.labels[~column.missing], return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            self.counts[value] = self.counts.get(value, 0) + count
        if len(self.counts) > self._capacity:
            cut = sorted(self.counts.values(), reverse=True)[self._capacity]
            self.counts = {v: c - cut for v, c in self.counts.items() if c > cut}


class _CategoricalCounts:
    """Pass 2 for a categorical column: exact counts of the pass-1 candidates."""

    def __init__(self, stats: _CategoricalStats, top_k: int) -> None:
        self.stats, self.top_k = stats, top_k
        self.candidates = np.array(sorted(stats.counts), dtype=str)
        self.lookup = categories(self.candidates.tolist())
        self.counts = np.zeros(self.candidates.size + 2, dtype=np.int64)

    def add(self, column: CategoricalColumn) -> None:
        codes = categorical_codes(column.labels, self.lookup)
        codes[column.missing] = self.candidates.size + 1
        self.counts += np.bincount(codes, minlength=self.counts.size)

    def feature(self, name: str) -> CategoricalFeature:
        s, n = self.stats, self.candidates.size
        order = np.lexsort((self.candidates, -self.counts[:n]))  # by count, ties by value
        top = [i for i in order[: self.top_k].tolist() if self.counts[i] > 0]
        values = self.candidates[top].tolist()
        kept = self.counts[top]
        unseen = s.rows - s.missing - int(kept.sum())
        counts = np.concatenate((kept, [unseen, s.missing]))
        return CategoricalFeature(
            name=name,
            count=s.rows,
            missing=s.missing,
            values=values,
            fractions=_fractions(categorical_labels(values), counts, s.rows),
        )


def _fractions(labels: list[str], counts: NDArray[np.int64], rows: int) -> dict[str, float]:
    shares = counts / rows if rows else np.zeros(counts.size)
    return dict(zip(labels, shares.tolist(), strict=True))


def _round(value: float | None) -> float | None:
    # 12 significant digits: sums taken over differently sized batches (CSV blocks vs Parquet row
    # groups) differ in the last bits; rounding keeps the profile, and its hash, identical.
    return None if value is None else float(f"{value:.12g}")


# --- building -----------------------------------------------------------------------------------


def build_from_batches(
    batches: Callable[[], Iterable[Batch]],
    features: Sequence[tuple[str, Kind]],
    outputs: Sequence[tuple[str, Kind]] = (),
    *,
    top_k: int = DEFAULT_TOP_K,
    bins: int = N_BINS,
    sample_size: int = SAMPLE_SIZE,
    source: str = "",
) -> Profile:
    """Build a profile in two passes; `batches()` is called twice and must yield the same rows.

    Every name in `features` and `outputs` is a key of the batches' column mappings; a column
    absent from a batch counts as missing there.
    """
    if not 1 <= top_k <= MAX_TOP_K:
        msg = f"top-k must be between 1 and {MAX_TOP_K}, not {top_k}"
        raise ProfileError(msg)
    specs = [*features, *outputs]
    rng = np.random.default_rng(0)  # fixed: the same data always gives the same profile
    stats: dict[str, _NumericStats | _CategoricalStats] = {
        name: _NumericStats(sample_size, bins)
        if kind == "numeric"
        else _CategoricalStats(SUMMARY_SIZE)
        for name, kind in specs
    }
    rows = 0
    for n, columns in batches():
        rows += n
        keys = rng.random(n)
        for name, kind in specs:
            column = _column(columns, name, kind, n)
            if isinstance(stat := stats[name], _NumericStats):
                stat.add(_as_numeric(column), keys)
            else:
                stat.add(_as_categorical(column))
    counters = {
        name: _NumericCounts(s) if isinstance(s, _NumericStats) else _CategoricalCounts(s, top_k)
        for name, s in stats.items()
    }
    for n, columns in batches():
        for name, kind in specs:
            column = _column(columns, name, kind, n)
            if isinstance(counter := counters[name], _NumericCounts):
                counter.add(_as_numeric(column))
            else:
                counter.add(_as_categorical(column))
    return Profile(
        source=source,
        rows=rows,
        bins=bins,
        top_k=top_k,
        features=[counters[name].feature(name) for name, _ in features],
        outputs=[counters[name].feature(name) for name, _ in outputs],
    )


def _column(columns: Mapping[str, Column], name: str, kind: Kind, rows: int) -> Column:
    column = columns.get(name)
    if column is None:
        return absent(kind, rows)
    if column.missing.size != rows:
        msg = f"column {name!r} has {column.missing.size} values in a batch of {rows} rows"
        raise ValueError(msg)
    return column


def _as_numeric(column: Column) -> NumericColumn:
    if isinstance(column, NumericColumn):
        return column
    msg = "a categorical column was handed to a numeric feature"
    raise TypeError(msg)


def _as_categorical(column: Column) -> CategoricalColumn:
    if isinstance(column, CategoricalColumn):
        return column
    msg = "a numeric column was handed to a categorical feature"
    raise TypeError(msg)
