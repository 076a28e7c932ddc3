"""The reference profile: what "no drift" looks like, built from training data in two passes.

Pass 1 streams every batch once and keeps, per column, counts, moments, the exact range, a bottom-k
random sample (a uniform sample that merges across batches) and up to B+1 distinct values; per
categorical column a Misra-Gries summary of the frequent values. The sample only places the bin
edges and CDF knots; pass 2 then counts every row against them, so every fraction and every CDF
value in the profile is exact. Memory is bounded by columns x sample size, never by rows, so a file
larger than memory works.

Profiles are versioned JSON (``"version": 1``); `content_hash` names one in metric labels.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from sidecar.drift.sketches import (
    CDF_LEVELS,
    N_BINS,
    Float,
    categorical_codes,
    categorical_labels,
    categories,
    equal_mass_edges,
    number_labels,
    numeric_codes,
    numeric_labels,
    search_points,
)
from sidecar.drift.sources import READERS, Format, ProfileError, format_of, progress_bar
from sidecar.files import write_atomically

__all__ = [
    "CLASS",
    "CONFIDENCE",
    "DEFAULT_TOP_K",
    "MAX_TOP_K",
    "VALUE",
    "VERSION",
    "CategoricalColumn",
    "CategoricalFeature",
    "Feature",
    "Kind",
    "NumericColumn",
    "NumericFeature",
    "Profile",
    "ProfileError",
    "build",
    "build_from_batches",
    "content_hash",
    "load",
    "save",
    "validate",
]

VERSION = 1
DEFAULT_TOP_K = 20
MAX_TOP_K = 50
SAMPLE_SIZE = 20_000  # per numeric column; places edges to about +-0.4% of mass
SUMMARY_SIZE = 20 * MAX_TOP_K  # frequent-value candidates kept per categorical column in pass 1

CLASS, CONFIDENCE, VALUE = "__class__", "__confidence__", "__value__"
OUTPUT_KINDS: Mapping[str, Kind] = {CLASS: "categorical", CONFIDENCE: "numeric", VALUE: "numeric"}

Kind = Literal["numeric", "categorical"]


# --- the document -------------------------------------------------------------------------------


class NumericFeature(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="numeric", tag_field="kind"
):
    """A numeric column. Counts are rows; `mean`..`max` are over finite values only."""

    name: str
    count: int
    missing: int  # absent or null
    nan: int  # present but not a number
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    edges: list[float]  # B+1 equal-mass edges, min .. max; empty if no finite value
    fractions: dict[str, float]  # bin label -> share of `count`, layout order
    cdf_x: list[float]  # knots, strictly increasing
    cdf_below: list[float]  # F(x-) among values that are numbers
    cdf_at: list[float]  # F(x)


class CategoricalFeature(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="categorical", tag_field="kind"
):
    """A categorical column: its top-K values; everything else shares the `unseen` bin."""

    name: str
    count: int
    missing: int
    values: list[str]
    fractions: dict[str, float]


Feature = NumericFeature | CategoricalFeature


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A reference profile. `outputs` uses the names __class__, __confidence__ and __value__."""

    version: int = VERSION
    source: str = ""  # file name it was built from; not part of the content hash
    rows: int
    bins: int
    top_k: int
    features: list[Feature]
    outputs: list[Feature] = msgspec.field(default_factory=list)


class _Header(msgspec.Struct):
    version: int


def content_hash(profile: Profile) -> str:
    """Short stable hash of what the profile says (not where it came from), for metric labels."""
    body = msgspec.json.encode(msgspec.structs.replace(profile, source=""), order="deterministic")
    return hashlib.sha256(body).hexdigest()[:16]


def save(profile: Profile, path: str | os.PathLike[str]) -> None:
    """Write the profile as indented JSON, atomically (a reader never sees half a file)."""
    text = msgspec.json.format(msgspec.json.encode(profile), indent=2) + b"\n"
    write_atomically(Path(path), text)


def load(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile; every problem is a ProfileError naming the file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        msg = f"{path}: cannot read profile: {exc.strerror or exc}"
        raise ProfileError(msg) from exc
    try:
        version = msgspec.json.decode(raw, type=_Header).version
        if version != VERSION:
            msg = f"unsupported profile version {version} (this sidecar reads version {VERSION})"
            raise ProfileError(msg)
        profile = msgspec.json.decode(raw, type=Profile)
        validate(profile)
    except (msgspec.DecodeError, ProfileError) as exc:
        msg = f"{path}: {exc}"
        raise ProfileError(msg) from exc
    return profile


def validate(profile: Profile) -> None:
    """Check what the types cannot: labels, monotone edges and CDFs, fractions summing to 1."""
    if not 1 <= profile.top_k <= MAX_TOP_K:
        msg = f"top_k is {profile.top_k}; it must be between 1 and {MAX_TOP_K}"
        raise ProfileError(msg)
    names = [f.name for f in (*profile.features, *profile.outputs)]
    if len(set(names)) != len(names):
        msg = f"duplicate feature names in {names}"
        raise ProfileError(msg)
    for output in profile.outputs:
        if OUTPUT_KINDS.get(output.name) != _kind(output):
            msg = f"output {output.name!r}: expected one of {dict(OUTPUT_KINDS)}"
            raise ProfileError(msg)
    for feature in (*profile.features, *profile.outputs):
        problem = _problem(feature)
        if problem:
            msg = f"feature {feature.name!r}: {problem}"
            raise ProfileError(msg)


def _kind(feature: Feature) -> Kind:
    return "numeric" if isinstance(feature, NumericFeature) else "categorical"


def _problem(feature: Feature) -> str | None:
    if not 0 <= feature.missing <= feature.count:
        return f"missing count {feature.missing} is outside 0..{feature.count}"
    if isinstance(feature, NumericFeature):
        return _numeric_problem(feature)
    if len(set(feature.values)) != len(feature.values) or len(feature.values) > MAX_TOP_K:
        return f"values must be distinct and at most {MAX_TOP_K}"
    return _fractions_problem(feature, categorical_labels(feature.values))


def _numeric_problem(feature: NumericFeature) -> str | None:
    edges = np.asarray(feature.edges, dtype=np.float64)
    if edges.size == 1 or edges.size > 101:
        return f"has {edges.size} edges; expected 0 or 2..101"
    if edges.size and not (np.all(np.diff(edges[:-1]) > 0) and edges[-1] >= edges[-2]):
        return "edges must increase"
    x, below, at = (
        np.asarray(v, dtype=np.float64) for v in (feature.cdf_x, feature.cdf_below, feature.cdf_at)
    )
    if not x.size == below.size == at.size:
        return "cdf_x, cdf_below and cdf_at must have the same length"
    if np.any(np.diff(x) <= 0) or np.any(below > at) or np.any(np.diff(at) < 0):
        return "the CDF must increase"
    if x.size and (below.min() < 0 or at.max() > 1 + 1e-9):
        return "CDF values must lie in [0, 1]"
    return _fractions_problem(feature, numeric_labels(max(edges.size - 1, 0)))


def _fractions_problem(feature: Feature, labels: list[str]) -> str | None:
    if list(feature.fractions) != labels:
        return f"fractions must have the labels {labels}, in that order"
    values = np.fromiter(feature.fractions.values(), dtype=np.float64)
    total = float(values.sum())
    if np.any(values < 0) or (feature.count and abs(total - 1.0) > 1e-6):
        return f"fractions must be non-negative and sum to 1 (they sum to {total:.9g})"
    return None


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


def _absent(kind: Kind, rows: int) -> Column:
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
        return _absent(kind, rows)
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
        return _absent(kind, rows)
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
