"""Output and data-quality recorders: batch counts equal what per-row counting would give."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from sidecar.config import FeatureRule
from sidecar.exchange import Exchange
from sidecar.extract.types import FeatureTable, Outputs
from sidecar.recorders.batch import observe_many
from sidecar.recorders.labels import OTHER, LabelCap, OverflowCounter
from sidecar.recorders.outputs import OutputRecorder
from sidecar.recorders.quality import QualityRecorder
from sidecar.recorders.red import RedRecorder

MODEL = ("iris", "v1")
M = {"model_name": "iris", "model_version": "v1"}


def outputs_recorder(registry: CollectorRegistry, cap: int = 50) -> OutputRecorder:
    return OutputRecorder(
        registry, overflow=OverflowCounter(registry), label_cap=cap, low_confidence_threshold=0.7
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6) | st.just(math.nan), max_size=300))
def test_observe_many_matches_observe(values):
    """One batch update gives the same buckets, sum and count as observing value by value."""
    bounds = (0.0, 0.1, 0.5, 1.0, 10.0, 1000.0)
    one, many = CollectorRegistry(), CollectorRegistry()
    by_one = Histogram("h", "h", buckets=bounds, registry=one)
    by_many = Histogram("h", "h", buckets=bounds, registry=many)
    for value in values:
        if not math.isnan(value):
            by_one.observe(value)
    observe_many(by_many, np.asarray(values, dtype=np.float64))
    for bound in [*map(str, bounds), "+Inf"]:
        assert one.get_sample_value("h_bucket", {"le": bound}) == many.get_sample_value(
            "h_bucket", {"le": bound}
        )
    assert one.get_sample_value("h_count") == many.get_sample_value("h_count")
    assert math.isclose(
        one.get_sample_value("h_sum") or 0.0, many.get_sample_value("h_sum") or 0.0, abs_tol=1e-6
    )


def test_predictions_confidence_and_batch():
    """Classes are counted per row, confidences observed, low ones counted, batch size kept."""
    registry = CollectorRegistry()
    recorder = outputs_recorder(registry)
    classes = np.array(["a", "b", "a", "a"], dtype=object)
    confidence = np.array([0.9, 0.6, 0.95, 0.5])
    recorder.record(MODEL, "infer", Outputs(classes, confidence), [4])
    assert registry.get_sample_value("ml_predictions_total", {**M, "class": "a"}) == 3
    assert registry.get_sample_value("ml_predictions_total", {**M, "class": "b"}) == 1
    assert registry.get_sample_value("ml_prediction_confidence_count", M) == 4
    assert registry.get_sample_value("ml_prediction_confidence_bucket", {**M, "le": "0.6"}) == 2
    assert registry.get_sample_value("ml_low_confidence_predictions_total", M) == 2
    assert registry.get_sample_value("ml_batch_size_sum", {**M, "route": "infer"}) == 4


def test_class_labels_are_capped_and_overflow_counted():
    """Beyond the cap, new classes fold into __other__ and the fold is counted."""
    registry = CollectorRegistry()
    recorder = outputs_recorder(registry, cap=2)
    classes = np.array([f"c{i}" for i in range(10)], dtype=object)
    recorder.record(MODEL, "infer", Outputs(classes=classes), [10])
    assert registry.get_sample_value("ml_predictions_total", {**M, "class": OTHER}) == 8
    assert registry.get_sample_value("sidecar_label_overflow_total", {"label": "class"}) == 8
    series = [s for m in registry.collect() for s in m.samples if s.name == "ml_predictions_total"]
    assert len(series) == 3


def test_label_cap_allow_list():
    """With an allow-list, only listed values become labels."""
    cap = LabelCap("model_name", limit=50, overflow=None, allowed=("iris",))
    assert [cap.fold(v) for v in ("iris", "evil", "iris")] == ["iris", OTHER, "iris"]


def test_regression_values():
    """Regression outputs land in ml_prediction_value."""
    registry = CollectorRegistry()
    recorder = outputs_recorder(registry)
    values = np.array([1.5, -3.0, 250.0])
    recorder.record(MODEL, "score", Outputs(value=values), [3])
    assert registry.get_sample_value("ml_prediction_value_count", M) == 3
    # prometheus_client leaves out _sum when buckets go below zero (the sum may then decrease).
    assert registry.get_sample_value("ml_prediction_value_bucket", {**M, "le": "0.0"}) == 1
    assert registry.get_sample_value("ml_prediction_value_bucket", {**M, "le": "1000.0"}) == 3


def test_quality_counts_by_reason():
    """Missing, NaN, inf, wrong type and out-of-range cells are each counted per feature."""
    registry = CollectorRegistry()
    recorder = QualityRecorder(
        registry,
        rules={"a": FeatureRule(min=0, max=10), "c": FeatureRule(type="categorical")},
        overflow=OverflowCounter(registry),
        label_cap=50,
    )
    nan, inf = math.nan, math.inf
    numeric = np.array([[1.0, nan, nan], [20.0, inf, nan], [nan, 2.0, nan], [-1.0, nan, nan]])
    missing = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=bool)
    non_numeric = np.array([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 0]], dtype=bool)
    table = FeatureTable(("a", "b", "c"), numeric, missing, non_numeric)
    recorder.record(MODEL, table)

    def invalid(feature: str, reason: str) -> float | None:
        labels = {**M, "feature": feature, "reason": reason}
        return registry.get_sample_value("ml_feature_invalid_total", labels)

    assert registry.get_sample_value("ml_feature_missing_total", {**M, "feature": "a"}) == 1
    assert registry.get_sample_value("ml_feature_missing_total", {**M, "feature": "b"}) == 1
    assert invalid("a", "out_of_range") == 2
    assert invalid("b", "inf") == 1
    assert invalid("b", "wrong_type") == 1
    assert invalid("c", "wrong_type") is None  # categorical strings are fine
    assert invalid("a", "nan") is None


EXCHANGES = st.lists(
    st.tuples(
        st.sampled_from(["GET", "POST", "BREW"]),
        st.sampled_from([200, 404, 499, 502, 503]),
        st.sampled_from([None, "upstream_timeout", "client_disconnect"]),
        st.floats(0.0, 2.0),  # upstream seconds; 0 = no answer
        st.floats(0.0, 0.01),  # the hop's own time
        st.integers(0, 10**6),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(EXCHANGES)
def test_red_record_many_matches_one_by_one(drawn):
    """The batch path (numpy, one increment per bucket) gives the per-exchange path's counts."""
    exchanges = [
        Exchange(
            method=method,
            path="/p",
            status=status,
            request_id="r",
            request_headers={},
            response_headers={},
            request_body=None,
            response_body=None,
            request_size=size,
            response_size=size // 2,
            upstream_seconds=upstream,
            total_seconds=upstream + hop,
            error=error,
        )
        for method, status, error, upstream, hop, size in drawn
    ]
    one, many = CollectorRegistry(), CollectorRegistry()
    by_one, by_many = RedRecorder(one), RedRecorder(many)
    for exchange in exchanges:
        by_one.record(MODEL, "route", exchange)
    by_many.record_many(MODEL, "route", exchanges)
    assert samples(many) == pytest.approx(samples(one))


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
