"""Quality figures from labelled rows: accuracy, per-class precision, recall and F1, macro F1, MAE
and RMSE over windows of the prediction log, exported as gauges.

The writer thread recomputes them from the store (`WindowGauges.refresh`, grouped in SQL) and
swaps in a new snapshot; a scrape only reads that snapshot. The fleet-wide, mergeable figures come
from the counters in recorder.py and the recording rules; these gauges are for windows counted in
rows, which PromQL cannot express. They are figures of the store: one pod's SQLite file, or the
fleet's shared PostgreSQL table, where every replica reports the same fleet figure (aggregate
them with max(), never sum()).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.feedback.settings import FeedbackSettings
from sidecar.feedback.store import MISSING_SEGMENT, Group, PredictionStore
from sidecar.recorders.labels import OTHER
from sidecar.recorders.red import MODEL_LABELS

__all__ = ["ClassScores", "WindowGauges", "classification_scores", "window_name"]

ALL_ROWS = ""  # the segment label of figures over every row of the window

# name -> (help, labels after model_name and model_version)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ml_labelled_rows": ("Labelled rows in the window (per store).", ("window", "segment")),
    "ml_accuracy": (
        "Share of labelled rows whose predicted class was the label, over the window (per store).",
        ("window", "segment"),
    ),
    "ml_precision": (
        "Of the rows predicted as this class, the share labelled so (per store).",
        ("window", "segment", "class"),
    ),
    "ml_recall": (
        "Of the rows labelled as this class, the share predicted so (per store).",
        ("window", "segment", "class"),
    ),
    "ml_f1": ("Harmonic mean of precision and recall (per store).", ("window", "segment", "class")),
    "ml_macro_f1": (
        "Unweighted mean of F1 over every class labelled or predicted in the window (per store).",
        ("window", "segment"),
    ),
    "ml_mae": ("Mean absolute error of regression outputs (per store).", ("window", "segment")),
    "ml_rmse": (
        "Root mean squared error of regression outputs (per store).",
        ("window", "segment"),
    ),
}

Sample = tuple[str, tuple[str, ...], float]
Fold = Callable[[tuple[str, str], str], str]


@dataclass(frozen=True, slots=True)
class ClassScores:
    precision: float
    recall: float
    f1: float


def classification_scores(
    confusion: Mapping[tuple[str, str], int],
) -> tuple[float, dict[str, ClassScores], float]:
    """(accuracy, scores per class, macro F1) from {(label, predicted): rows}.

    Classes are those labelled or predicted; a ratio with nothing to divide by is 0, as in
    scikit-learn's defaults.

    >>> accuracy, scores, macro = classification_scores({("a", "a"): 3, ("a", "b"): 1})
    >>> accuracy, scores["a"], round(macro, 4)
    (0.75, ClassScores(precision=1.0, recall=0.75, f1=0.8571428571428571), 0.4286)
    """
    labelled: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    for (label, guess), rows in confusion.items():
        labelled[label] += rows
        predicted[guess] += rows
    scores = {}
    for name in sorted(labelled.keys() | predicted.keys()):
        hits = confusion.get((name, name), 0)
        scores[name] = ClassScores(
            precision=hits / predicted[name] if predicted[name] else 0.0,
            recall=hits / labelled[name] if labelled[name] else 0.0,
            f1=2 * hits / (labelled[name] + predicted[name]),
        )
    total = sum(labelled.values())
    accuracy = sum(confusion.get((n, n), 0) for n in labelled) / total if total else 0.0
    macro = sum(s.f1 for s in scores.values()) / len(scores) if scores else 0.0
    return accuracy, scores, macro


def window_name(seconds: float) -> str:
    """3600 -> "1h", 90 -> "90s": the `window` label of a time window."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass
class _Tally:
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)
    regression_rows: int = 0
    absolute_error: float = 0.0
    squared_error: float = 0.0

    def add(self, group: Group) -> None:
        if group.label is not None and group.predicted is not None:
            self.confusion[group.label, group.predicted] += group.rows
        elif group.absolute_error is not None and group.squared_error is not None:
            self.regression_rows += group.rows
            self.absolute_error += group.absolute_error
            self.squared_error += group.squared_error


class WindowGauges(Collector):
    """The gauges above, for every model with labels and every configured window."""

    def __init__(
        self,
        registry: CollectorRegistry,
        settings: FeedbackSettings,
        *,
        fold_class: Fold,
        fold_segment: Fold | None,
    ) -> None:
        self._windows: list[tuple[str, int | None, float | None]]
        self._windows = [(f"{n}_rows", n, None) for n in settings.window_rows]
        self._windows += [(window_name(s), None, s) for s in settings.window_seconds]
        self._fold_class = fold_class
        self._fold_segment = fold_segment
        self._samples: list[Sample] = []
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = {family.name: family for family in self._families()}
        for name, labels, value in self._samples:  # one reference read: the list is never mutated
            families[name].add_metric(labels, value)
        return families.values()

    def refresh(self, store: PredictionStore, now: float) -> None:
        """Recompute every window from the store; runs on the prediction log's thread."""
        samples: list[Sample] = []
        for model in sorted(store.labelled_models()):
            for window, last_rows, seconds in self._windows:
                since = None if seconds is None else now - seconds
                groups = store.window(model, last_rows=last_rows, since=since)
                samples.extend(self._samples_of(model, window, groups))
        self._samples = samples

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(name, text, labels=[*MODEL_LABELS, *labels])
            for name, (text, labels) in FAMILIES.items()
        ]

    def _samples_of(
        self, model: tuple[str, str], window: str, groups: list[Group]
    ) -> Iterator[Sample]:
        tallies: dict[str, _Tally] = {ALL_ROWS: _Tally()}
        for group in groups:
            tallies[ALL_ROWS].add(group)
            if self._fold_segment is not None:
                segment = self._fold_segment(model, group.segment or MISSING_SEGMENT)
                tallies.setdefault(segment, _Tally()).add(group)
        for segment, tally in tallies.items():
            labels = (*model, window, segment)
            rows = sum(tally.confusion.values()) + tally.regression_rows
            if rows:
                yield "ml_labelled_rows", labels, float(rows)
            if tally.confusion:
                yield from self._classification(model, labels, tally.confusion)
            if tally.regression_rows:
                yield "ml_mae", labels, tally.absolute_error / tally.regression_rows
                yield "ml_rmse", labels, math.sqrt(tally.squared_error / tally.regression_rows)

    def _classification(
        self, model: tuple[str, str], labels: tuple[str, ...], confusion: Counter[tuple[str, str]]
    ) -> Iterator[Sample]:
        accuracy, scores, macro = classification_scores(confusion)
        yield "ml_accuracy", labels, accuracy
        yield "ml_macro_f1", labels, macro
        for name, score in scores.items():
            # Classes past the cap have no series: averaging them into __other__ means nothing.
            if self._fold_class(model, name) == OTHER:
                continue
            yield "ml_precision", (*labels, name), score.precision
            yield "ml_recall", (*labels, name), score.recall
            yield "ml_f1", (*labels, name), score.f1
