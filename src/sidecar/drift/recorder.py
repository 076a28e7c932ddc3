"""Drift: bin every feature and output against a reference, export what merges across replicas (bin
counters, a PIT histogram, reference fractions) and per-pod scores over an in-process window.

`observe_*` run on the event loop: one searchsorted per feature and one bincount per batch, then a
short locked add. `collect()` may run on the exposition thread: it copies the arrays under the lock
and does the arithmetic outside it.

Counting (per-feature specs, counts, windows, the payload adapters) is drift/counts.py, the
settings drift/settings.py; this module holds the scores, the recorder with its reference
freezing, and the export.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import msgspec
import numpy as np
from numpy.typing import NDArray
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sidecar.drift import floors, summary, verdict
from sidecar.drift import profile as profiles
from sidecar.drift import sketches as sk
from sidecar.drift.counts import (
    WINDOW_SLOTS,
    Counts,
    Group,
    Numeric,
    Raw,
    Spec,
    concat_outputs,
    concat_tables,
    output_raws,
    output_rows,
    table_raws,
)
from sidecar.drift.settings import DriftSettings, Kind
from sidecar.extract.types import FeatureTable, Outputs

__all__ = ["DriftRecorder"]

MODEL_LABELS = ("model_name", "model_version")
NUMERIC_STATS = ("psi", "ks", "js", "linf", "wasserstein")
CATEGORICAL_STATS = ("psi", "js", "linf")
# The severity (verdict.py), exported as one more ml_drift_score stat: the larger of the window's
# and its short part's, since status grades both.
SHIFT = "shift"
MAX_FEATURES = 256  # a reference frozen from traffic covers at most this many columns
# Small batches are counted together once this many rows are waiting (fewer with a count window:
# at most one of its slots, so that the window still moves in tenths of its size).
POOL_ROWS = 2048

# --- scores and verdicts ------------------------------------------------------------------------


class _Score(NamedTuple):
    value: float
    floor: float  # NaN for the statistics that decide nothing (js, linf)


class _Judged(NamedTuple):
    """One window of one feature: its scores, its shift (verdict.py) and the level it earns."""

    scores: dict[str, _Score]
    shift: float
    level: int


def _judge(
    spec: Spec,
    bins: NDArray[np.int64],
    rows: int,
    view: _FeatureView,
    level: float,
    settings: DriftSettings,
) -> _Judged:
    """Score one window, and grade it: a level above 0 needs min_window rows, a deciding
    statistic above its floor at the corrected `level`, and a shift of at least warning_shift."""
    nan = _Score(math.nan, math.nan)
    if rows == 0:
        stats = NUMERIC_STATS if isinstance(spec, Numeric) else CATEGORICAL_STATS
        return _Judged(dict.fromkeys(stats, nan), math.nan, 0)
    p, q = bins / rows, spec.reference
    scores = {
        "psi": _Score(sk.psi(p, q), spec.psi_floors.floor(rows, level)),
        "js": _Score(sk.js(p, q), math.nan),
        "linf": _Score(sk.linf(p, q), math.nan),
    }
    judged = [rows]  # the rows each deciding statistic read, in the order of `decisive`
    if isinstance(spec, Numeric):
        shift = _numeric_shares_shift(p, q)
        numbers = int(view.cells.sum())
        if numbers == 0:
            scores["ks"] = scores["wasserstein"] = nan
        else:
            below, above = int(bins[0]), int(bins[spec.bins + 1])
            ks = sk.ks_from_pit(view.cells, below, above)
            w = sk.wasserstein_from_pit(view.cells, below, above, view.tails, spec.quantiles)
            w_floor = floors.wasserstein_floor(numbers, spec.numbers, level, spec.spread)
            scores["ks"] = _Score(ks, floors.ks_floor(numbers, spec.numbers, level))
            scores["wasserstein"] = _Score(w / spec.scale, w_floor)
            shift = max(shift, w / spec.scale)
        judged += [numbers, numbers]
        decisive: tuple[str, ...] = verdict.NUMERIC_TESTS
    else:
        shift = verdict.share_shift(p, q)
        decisive = verdict.CATEGORICAL_TESTS
    significant = any(
        n >= settings.min_window and scores[stat].value > scores[stat].floor
        for stat, n in zip(decisive, judged, strict=True)
    )
    grade = verdict.grade(shift, settings.warning_shift, settings.critical_shift)
    return _Judged(scores, shift, grade if significant else 0)


def _numeric_shares_shift(p: sk.Float, q: sk.Float) -> float:
    """The shift of the shares of numbers, missing and not-a-number cells (the last two bins)."""

    def shares(x: sk.Float) -> sk.Float:
        return np.array([1.0 - x[-2] - x[-1], x[-2], x[-1]])

    return verdict.share_shift(shares(p), shares(q))


class _FeatureView(NamedTuple):
    cells: NDArray[np.int64]
    pit_sum: float
    tails: tuple[float, float]


def _view(group: Group, i: int, counts: Counts) -> _FeatureView:
    k = group.numeric_slot.get(i)
    if k is None:
        return _FeatureView(np.zeros(0, dtype=np.int64), 0.0, (0.0, 0.0))
    cells = counts.cells[k * sk.PIT_CELLS : (k + 1) * sk.PIT_CELLS]
    return _FeatureView(
        cells, float(counts.pit_sum[k]), (float(counts.tails[k, 0]), float(counts.tails[k, 1]))
    )


class _Snapshot(NamedTuple):
    """A group's counts at one scrape: all time, the window, and its short (recent) part."""

    total: Counts
    window: Counts
    recent: Counts


def _tests(groups: Iterable[Group]) -> int:
    """How many tests one scrape makes: per window, every feature's deciding statistics."""
    per_window = sum(
        len(verdict.NUMERIC_TESTS if isinstance(spec, Numeric) else verdict.CATEGORICAL_TESTS)
        for group in groups
        for spec in group.specs
    )
    return per_window * verdict.WINDOWS


# --- the recorder -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Side:
    """Inputs or outputs: a group once there is a reference, pending rows until then."""

    group: Group | None = None
    features: list[profiles.Feature] | None = None
    pending: list[tuple[int, dict[str, Raw]]] | None = None
    pending_rows: int = 0


class _Families(NamedTuple):
    bins: CounterMetricFamily
    reference: GaugeMetricFamily
    pit: HistogramMetricFamily
    score: GaugeMetricFamily
    floor: GaugeMetricFamily
    window: GaugeMetricFamily
    status: GaugeMetricFamily
    share: GaugeMetricFamily
    dataset: GaugeMetricFamily
    frozen: GaugeMetricFamily


class DriftRecorder(Collector):
    """Drift metrics for one model. Register it on a CollectorRegistry; feed it every batch.

    With a profile, every label set it defines exists from the start (empty bins read 0). Without
    one (or for a side the profile lacks: inputs or outputs), the first `freeze_after` rows of that
    side, rounded up to whole batches, become its reference; until then
    `ml_drift_reference_frozen` reads 0.
    """

    def __init__(
        self,
        profile: profiles.Profile | None,
        *,
        model_name: str,
        model_version: str,
        settings: DriftSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        prefix: str = "ml_",
    ) -> None:
        self._settings = settings or DriftSettings()
        self._model = [model_name, model_version]
        self._clock, self._prefix = clock, prefix
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(0)  # PIT tie-breaking at repeated values
        self._profile = profile
        self._inputs, self._outputs = _Side(), _Side()
        self._pooled_tables: list[FeatureTable] = []
        self._pooled_outputs: list[Outputs] = []
        self._pooled_rows = [0, 0]  # features, outputs: each side fills its own window slots
        self._pool_rows = POOL_ROWS
        if self._settings.window == "count":
            slot = int(self._settings.window_length / WINDOW_SLOTS)
            self._pool_rows = max(1, min(POOL_ROWS, slot))
        for side, features in (
            (self._inputs, profile.features if profile else []),
            (self._outputs, profile.outputs if profile else []),
        ):
            if features:
                side.group = Group(features, self._settings.window, self._settings.window_length)
                side.features = list(features)
            else:
                side.pending = []

    @classmethod
    def from_settings(
        cls, settings: DriftSettings, *, model_name: str, model_version: str
    ) -> DriftRecorder:
        """Load `settings.profile` (raising ProfileError with the reason) and build the recorder."""
        profile = profiles.load(settings.profile) if settings.profile else None
        return cls(profile, model_name=model_name, model_version=model_version, settings=settings)

    @property
    def reference(self) -> profiles.Profile | None:
        """The reference in use: the profile, with any side frozen from traffic filled in."""
        self._flush()
        inputs, outputs = self._inputs.features, self._outputs.features
        if inputs is None and outputs is None:
            return None
        base = self._profile or profiles.Profile(
            rows=0, bins=sk.N_BINS, top_k=profiles.DEFAULT_TOP_K, features=[]
        )
        return msgspec.structs.replace(base, features=inputs or [], outputs=outputs or [])

    def observe_features(self, table: FeatureTable) -> None:
        """Count one batch of request features.

        Counting costs a few numpy calls per feature whatever the batch size, so small batches
        are pooled and counted a few hundred rows at a time (a scrape counts whatever is pooled):
        one-row requests would otherwise pay that fixed cost on every request.
        """
        if table.n_rows == 0 or not table.columns:
            return
        self._pooled_tables.append(table)
        self._pooled_rows[0] += table.n_rows
        if self._pooled_rows[0] >= self._pool_rows:
            self._flush()

    def observe_outputs(self, outputs: Outputs) -> None:
        """Count one batch of model outputs (__class__, __confidence__, __value__), pooled like
        features."""
        rows = output_rows(outputs)
        if not rows:
            return
        self._pooled_outputs.append(outputs)
        self._pooled_rows[1] += rows
        if self._pooled_rows[1] >= self._pool_rows:
            self._flush()

    def _flush(self) -> None:
        tables, outputs = self._pooled_tables, self._pooled_outputs
        self._pooled_tables, self._pooled_outputs, self._pooled_rows = [], [], [0, 0]
        for table in concat_tables(tables):
            self._count_features(table)
        for batch in concat_outputs(outputs):
            self._count_outputs(batch)

    def _count_features(self, table: FeatureTable) -> None:
        group = self._inputs.group
        if group is None:
            columns = table_raws(table)
            named = {name: columns[j] for j, name in enumerate(table.columns[:MAX_FEATURES])}
            self._pend(self._inputs, table.n_rows, named, frozen_kinds=None)
            return
        layout = group.layout(table.columns)
        if all(j is None for j in layout):
            return  # nothing in this payload is a profiled feature (another route's shape)
        raws = table_raws(table)
        counts = group.encode(
            [None if j is None else raws[j] for j in layout], table.n_rows, self._rng
        )
        self._add(group, counts)

    def _count_outputs(self, outputs: Outputs) -> None:
        raws = output_raws(outputs)
        if not raws:
            return
        rows = next(iter(raws.values())).values.size
        group = self._outputs.group
        if group is None:
            self._pend(self._outputs, rows, raws, frozen_kinds=profiles.OUTPUT_KINDS)
            return
        picked = [raws.get(spec.name) for spec in group.specs]
        if any(raw is not None for raw in picked):
            self._add(group, group.encode(picked, rows, self._rng))

    def _add(self, group: Group, counts: Counts) -> None:
        now = self._clock()
        with self._lock:
            group.total.add(counts)
            group.window.add(counts, now)

    def _pend(
        self, side: _Side, rows: int, raws: dict[str, Raw], frozen_kinds: Mapping[str, Kind] | None
    ) -> None:
        assert side.pending is not None  # a side without a group is collecting
        side.pending.append((rows, raws))
        side.pending_rows += rows
        if side.pending_rows < self._settings.freeze_after:
            return
        kinds = dict(frozen_kinds) if frozen_kinds else self._infer_kinds(side.pending)
        batches = [
            (n, {name: _column(raw, kinds[name]) for name, raw in columns.items() if name in kinds})
            for n, columns in side.pending
        ]
        specs = [(name, kinds[name]) for name in _names(side.pending) if name in kinds]
        built = summary.build_from_batches(
            lambda: batches, specs, sample_size=max(summary.SAMPLE_SIZE, side.pending_rows)
        )
        group = Group(built.features, self._settings.window, self._settings.window_length)
        with self._lock:
            side.group, side.features, side.pending, side.pending_rows = (
                group,
                built.features,
                None,
                0,
            )

    def _infer_kinds(self, pending: Sequence[tuple[int, dict[str, Raw]]]) -> dict[str, Kind]:
        """Text-majority columns are categorical, the rest numeric; settings.feature_types wins."""
        text: dict[str, int] = {}
        numbers: dict[str, int] = {}
        for _, columns in pending:
            for name, raw in columns.items():
                is_text = (
                    raw.is_text
                    if raw.is_text is not None
                    else np.zeros(raw.values.size, dtype=bool)
                )
                text[name] = text.get(name, 0) + int(np.count_nonzero(is_text))
                numbers[name] = numbers.get(name, 0) + int(
                    np.count_nonzero(~raw.missing & ~is_text)
                )
        inferred: dict[str, Kind] = {
            name: "categorical" if text[name] > numbers[name] else "numeric" for name in text
        }
        return {
            **inferred,
            **{k: v for k, v in self._settings.feature_types.items() if k in inferred},
        }

    # --- exposition -----------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        self._flush()
        now = self._clock()
        with self._lock:
            views = [
                (g, _Snapshot(g.total.copy(), g.window.snapshot(now), g.window.recent(now)))
                for g in self._groups()
            ]
            collecting = any(side.pending_rows for side in (self._inputs, self._outputs))
        families = self._families()
        statuses: list[int] = []
        level = verdict.test_level(self._settings.noise_alpha, _tests(g for g, _ in views))
        for g, snapshot in views:
            for i, spec in enumerate(g.specs):
                status = self._export(families, g, i, spec, snapshot, level)
                if g is self._inputs.group:
                    statuses.append(status)
        share = sum(s > 0 for s in statuses) / len(statuses) if statuses else 0.0
        families.share.add_metric(self._model, share)
        families.dataset.add_metric(
            self._model, float(bool(statuses) and share >= self._settings.dataset_drift_share)
        )
        families.frozen.add_metric(self._model, float(bool(views) and not collecting))
        return list(families)

    def collect_cumulative(self) -> Iterable[Metric]:
        """The bin counts and the PIT histogram alone, which only grow: collect() without the
        work of the scores (for a worker's periodic snapshot, workers/snapshots.py)."""
        self._flush()
        with self._lock:
            totals = [(g, g.total.copy()) for g in self._groups()]
        families = self._families()
        for g, total in totals:
            for i, spec in enumerate(g.specs):
                self._export_counts(families, g, i, spec, total)
        return [families.bins, families.pit]

    def _groups(self) -> list[Group]:
        """The sides counting against their reference (inputs first); under the lock."""
        return [side.group for side in (self._inputs, self._outputs) if side.group is not None]

    def _export(
        self, f: _Families, group: Group, i: int, spec: Spec, snapshot: _Snapshot, level: float
    ) -> int:
        """One feature's series; its status: the higher of the long and the short window's."""
        self._export_counts(f, group, i, spec, snapshot.total)
        lo, hi = int(group.offsets[i]), int(group.offsets[i + 1])
        labels = [*self._model, spec.name]
        for label, share in zip(spec.labels, spec.reference.tolist(), strict=True):
            f.reference.add_metric([*labels, label], share)
        window, recent = (
            _judge(spec, w.bins[lo:hi], w.rows, _view(group, i, w), level, self._settings)
            for w in (snapshot.window, snapshot.recent)
        )
        for stat, score in window.scores.items():
            f.score.add_metric([*labels, stat], score.value)
            if not math.isnan(score.floor):
                f.floor.add_metric([*labels, stat], score.floor)
        f.score.add_metric([*labels, SHIFT], max(window.shift, recent.shift))
        f.window.add_metric(labels, snapshot.window.rows)
        status = max(window.level, recent.level)
        f.status.add_metric(labels, status)
        return status

    def _export_counts(self, f: _Families, group: Group, i: int, spec: Spec, total: Counts) -> None:
        """One feature's bin counts and, if it is numeric, its PIT histogram."""
        lo, hi = int(group.offsets[i]), int(group.offsets[i + 1])
        labels = [*self._model, spec.name]
        for label, count in zip(spec.labels, total.bins[lo:hi].tolist(), strict=True):
            f.bins.add_metric([*labels, label], count)
        if isinstance(spec, Numeric):
            self._export_pit(f, labels, _view(group, i, total))

    @staticmethod
    def _export_pit(f: _Families, labels: list[str], view: _FeatureView) -> None:
        cumulative = sk.cumulative_pit_buckets(view.cells).tolist()
        buckets = list(zip(_PIT_LE, cumulative, strict=True))
        f.pit.add_metric(labels, [*buckets, ("+Inf", cumulative[-1])], view.pit_sum)

    def _families(self) -> _Families:
        p, model = self._prefix, list(MODEL_LABELS)
        feature = [*model, "feature"]
        return _Families(
            CounterMetricFamily(f"{p}drift_bin", _HELP["bin"], labels=[*feature, "bin"]),
            GaugeMetricFamily(
                f"{p}drift_reference_fraction", _HELP["ref"], labels=[*feature, "bin"]
            ),
            HistogramMetricFamily(f"{p}drift_pit", _HELP["pit"], labels=feature),
            GaugeMetricFamily(f"{p}drift_score", _HELP["score"], labels=[*feature, "stat"]),
            GaugeMetricFamily(f"{p}drift_noise_floor", _HELP["floor"], labels=[*feature, "stat"]),
            GaugeMetricFamily(f"{p}drift_window_rows", _HELP["window"], labels=feature),
            GaugeMetricFamily(f"{p}drift_status", _HELP["status"], labels=feature),
            GaugeMetricFamily(f"{p}dataset_drift_share", _HELP["share"], labels=model),
            GaugeMetricFamily(f"{p}dataset_drift", _HELP["dataset"], labels=model),
            GaugeMetricFamily(f"{p}drift_reference_frozen", _HELP["frozen"], labels=model),
        )


_HELP = {
    "bin": "Values per reference bin: b00.., below, above, missing, nan; categories: each "
    "reference value, unseen, missing.",
    "ref": "Share of the reference in each bin, to compare with increase(ml_drift_bin_total).",
    "pit": "u = F_ref(x) of every numeric value; uniform when nothing drifted.",
    "score": "Drift of this pod's in-process window against the reference (wasserstein and "
    "shift in reference standard deviations; shift is what status grades).",
    "floor": "Score a window of this size exceeds by chance, when nothing drifted, with "
    "probability noise_alpha divided by the tests the model makes.",
    "window": "Rows in this pod's in-process drift window.",
    "status": "0 ok, 1 warning, 2 critical: the window or its last fifth has min_window rows, "
    "a psi, ks or wasserstein score above its noise floor, and a shift of warning_shift "
    "(critical_shift) or more.",
    "share": "Share of input features whose drift status is warning or critical.",
    "dataset": "1 when the share of drifted input features reaches dataset_drift_share.",
    "frozen": "1 once every side with traffic has a reference; 0 while the first rows of a "
    "side are still being collected.",
}
_PIT_LE = tuple(repr(le) for le in sk.PIT_BUCKETS)  # "0.05" ... "1.0", as client_python writes


# --- freezing a reference from traffic ----------------------------------------------------------


def _column(raw: Raw, kind: Kind) -> summary.Column:
    """A raw column as the profile builder wants it (only when freezing: this formats numbers)."""
    if kind == "numeric":
        return summary.NumericColumn(np.where(raw.missing, np.nan, raw.values), raw.missing.copy())
    labels = np.full(raw.values.size, "", dtype=object)
    numbers = ~raw.missing & ~np.isnan(raw.values)
    labels[numbers] = sk.number_labels(raw.values[numbers])
    if raw.text is not None and raw.is_text is not None:
        labels[raw.is_text] = raw.text[raw.is_text].astype(str)
    return summary.CategoricalColumn(labels.astype(str), raw.missing.copy())


def _names(pending: Iterable[tuple[int, dict[str, Raw]]]) -> Iterator[str]:
    seen: dict[str, None] = {}
    for _, columns in pending:
        seen.update(dict.fromkeys(columns))
    return iter(list(seen)[:MAX_FEATURES])
