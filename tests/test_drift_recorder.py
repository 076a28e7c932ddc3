"""DriftRecorder: what it exports for what it is fed, read back through a fresh registry."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from sidecar.drift import profile as profiles
from sidecar.drift import summary
from sidecar.drift.recorder import DriftRecorder
from sidecar.drift.settings import DriftSettings
from sidecar.extract.types import FeatureTable, Outputs

MODEL = {"model_name": "iris", "model_version": "1"}


def reference(
    numeric: Mapping[str, np.ndarray] | None = None,
    categorical: Mapping[str, Sequence[str]] | None = None,
    outputs: Mapping[str, np.ndarray | Sequence[str]] | None = None,
) -> profiles.Profile:
    """A profile built in memory from complete columns (no missing values)."""
    columns: dict[str, summary.Column] = {}
    for name, values in (numeric or {}).items():
        columns[name] = summary.NumericColumn(
            np.asarray(values, float), np.zeros(len(values), bool)
        )
    rows = len(next(iter({**(numeric or {}), **(categorical or {})}.values())))
    for name, labels in (categorical or {}).items():
        columns[name] = summary.CategoricalColumn(np.array(labels, str), np.zeros(rows, bool))
    for name, output in (outputs or {}).items():
        kind = profiles.OUTPUT_KINDS[name]
        columns[name] = (
            summary.NumericColumn(np.asarray(output, float), np.zeros(rows, bool))
            if kind == "numeric"
            else summary.CategoricalColumn(np.array(output, str), np.zeros(rows, bool))
        )
    features = [(n, "numeric") for n in numeric or {}] + [
        (n, "categorical") for n in categorical or {}
    ]
    outs = [(n, profiles.OUTPUT_KINDS[n]) for n in outputs or {}]
    return summary.build_from_batches(lambda: [(rows, columns)], features, outs)  # type: ignore[arg-type]


def table(columns: Mapping[str, Sequence[Any]]) -> FeatureTable:
    """A FeatureTable as extraction builds it: numbers, None for missing, str for text cells."""
    names = tuple(columns)
    cells = list(zip(*columns.values(), strict=True))
    numeric = np.array(
        [[c if isinstance(c, float | int) else np.nan for c in row] for row in cells], float
    )
    missing = np.array([[c is None for c in row] for row in cells], bool)
    text = np.array([[isinstance(c, str) for c in row] for row in cells], bool)
    strings = {
        name: np.array([c if isinstance(c, str) else None for c in col], dtype=object)
        for name, col in columns.items()
        if any(isinstance(c, str) for c in col)
    }
    return FeatureTable(names, numeric.reshape(len(cells), len(names)), missing, text, strings)


def recorder(
    profile: profiles.Profile | None, **settings: Any
) -> tuple[DriftRecorder, CollectorRegistry]:
    registry = CollectorRegistry()
    rec = DriftRecorder(
        profile, model_name="iris", model_version="1", settings=DriftSettings(**settings)
    )
    registry.register(rec)
    return rec, registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {**MODEL, **labels})


def number(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample that must exist."""
    found = value(registry, name, **labels)
    assert found is not None, f"no {name} {labels}"
    return found


def stats_with_a_floor(registry: CollectorRegistry) -> set[str]:
    return {
        s.labels["stat"]
        for metric in registry.collect()
        for s in metric.samples
        if s.name == "ml_drift_noise_floor"
    }


UNIFORM = np.linspace(0.0, 1.0, 20_001)  # edges at 0, 0.05, ..., 1


def test_every_label_set_exists_at_start_and_reads_zero():
    """Bins of numeric and categorical features, PIT buckets and statuses exist before traffic."""
    _, registry = recorder(reference({"x": UNIFORM[:100]}, {"colour": ["red", "green"] * 50}))
    for bin_ in ("below", "b00", "b19", "above", "missing", "nan"):
        assert value(registry, "ml_drift_bin_total", feature="x", bin=bin_) == 0
    for bin_ in ("red", "green", "unseen", "missing"):
        assert value(registry, "ml_drift_bin_total", feature="colour", bin=bin_) == 0
    assert value(registry, "ml_drift_pit_bucket", feature="x", le="0.05") == 0
    assert value(registry, "ml_drift_pit_count", feature="x") == 0
    assert value(registry, "ml_drift_status", feature="colour") == 0
    assert value(registry, "ml_drift_window_rows", feature="x") == 0
    assert value(registry, "ml_drift_reference_frozen") == 1
    assert value(registry, "ml_dataset_drift_share") == 0


def test_reference_fractions_are_the_profiles():
    """ml_drift_reference_fraction repeats the profile's shares, bin by bin."""
    profile = reference({"x": UNIFORM[:100]}, {"colour": ["red"] * 30 + ["green"] * 70})
    _, registry = recorder(profile)
    assert value(registry, "ml_drift_reference_fraction", feature="colour", bin="green") == 0.7
    x = profile.features[0]
    for bin_, share in x.fractions.items():
        assert value(registry, "ml_drift_reference_fraction", feature="x", bin=bin_) == share


def test_numeric_values_land_in_their_bins():
    """Below and above the range, both end bins, missing, and NaN or text in the `nan` bin."""
    rec, registry = recorder(reference({"x": UNIFORM}))
    rec.observe_features(
        table({"x": [-1.0, 0.01, 0.99, 1.0, 2.0, float("inf"), None, "abc", float("nan")]})
    )
    counts = {
        b: value(registry, "ml_drift_bin_total", feature="x", bin=b)
        for b in ("below", "b00", "b19", "above", "missing", "nan")
    }
    assert counts == {"below": 1, "b00": 1, "b19": 2, "above": 2, "missing": 1, "nan": 2}


def test_a_feature_the_reference_never_saw_a_number_for_still_counts():
    """An all-missing reference column has no bins: numbers count as below, no score breaks."""
    profile = summary.build_from_batches(
        lambda: [(3, {"x": summary.NumericColumn(np.full(3, np.nan), np.ones(3, bool))})],
        [("x", "numeric")],
    )
    rec, registry = recorder(profile)
    rec.observe_features(table({"x": [1.0, 2.0, None]}))
    assert value(registry, "ml_drift_bin_total", feature="x", bin="below") == 2
    assert value(registry, "ml_drift_bin_total", feature="x", bin="above") == 0
    assert value(registry, "ml_drift_bin_total", feature="x", bin="missing") == 1
    assert value(registry, "ml_drift_pit_count", feature="x") == 2


def test_unnamed_columns_follow_the_profile_order():
    """A payload without names ("0", "1") is read as the profile's columns in order."""
    rec, registry = recorder(reference({"a": UNIFORM, "b": UNIFORM + 10}))
    rec.observe_features(table({"0": [0.52], "1": [10.52]}))
    assert value(registry, "ml_drift_bin_total", feature="a", bin="b10") == 1
    assert value(registry, "ml_drift_bin_total", feature="b", bin="b10") == 1


def test_categorical_values_unseen_and_missing():
    """Text and numbers match reference values (3 matches "3"); anything else is unseen."""
    rec, registry = recorder(reference(categorical={"c": ["red", "3", "green"] * 10}))
    rec.observe_features(table({"c": ["red", 3, "blue", None, 3.0, "green"]}))
    got = {
        b: value(registry, "ml_drift_bin_total", feature="c", bin=b)
        for b in ("red", "3", "green", "unseen", "missing")
    }
    assert got == {"red": 1, "3": 2, "green": 1, "unseen": 1, "missing": 1}


def test_absent_feature_counts_as_missing_and_foreign_tables_are_ignored():
    """A payload without one profiled column counts it missing; one without any is skipped."""
    rec, registry = recorder(reference({"a": UNIFORM, "b": UNIFORM}))
    rec.observe_features(table({"a": [0.5, 0.6]}))
    rec.observe_features(table({"other": [1.0]}))
    assert value(registry, "ml_drift_bin_total", feature="b", bin="missing") == 2
    assert value(registry, "ml_drift_window_rows", feature="a") == 2


def test_pit_histogram_is_cumulative_with_out_of_range_values_at_the_ends():
    """u = F_ref(x): 0.02 -> le 0.05, 0.5 -> le 0.5, below the range -> u 0, above -> u 1."""
    rec, registry = recorder(reference({"x": UNIFORM}))
    rec.observe_features(table({"x": [0.02, 0.5, -5.0, 7.0, None]}))
    bucket = {
        le: value(registry, "ml_drift_pit_bucket", feature="x", le=le)
        for le in ("0.05", "0.45", "0.5", "0.95", "1.0", "+Inf")
    }
    assert bucket == {"0.05": 2, "0.45": 2, "0.5": 3, "0.95": 3, "1.0": 4, "+Inf": 4}
    assert value(registry, "ml_drift_pit_count", feature="x") == 4
    assert value(registry, "ml_drift_pit_sum", feature="x") == pytest.approx(1.52, abs=0.01)


def test_outputs_drift_as_class_confidence_and_value():
    """Outputs go through the same bins under __class__, __confidence__ and __value__."""
    profile = reference(
        {"x": UNIFORM[:100]},
        outputs={"__class__": ["cat", "dog"] * 50, "__confidence__": UNIFORM[:100]},
    )
    rec, registry = recorder(profile)
    rec.observe_outputs(
        Outputs(
            classes=np.array(["dog", "emu", None], dtype=object),
            confidence=np.array([0.001, 2.0, np.nan]),
        )
    )
    assert value(registry, "ml_drift_bin_total", feature="__class__", bin="dog") == 1
    assert value(registry, "ml_drift_bin_total", feature="__class__", bin="unseen") == 1
    assert value(registry, "ml_drift_bin_total", feature="__class__", bin="missing") == 1
    assert value(registry, "ml_drift_bin_total", feature="__confidence__", bin="above") == 1
    assert value(registry, "ml_drift_bin_total", feature="__confidence__", bin="missing") == 1


def test_first_rows_freeze_into_the_reference_without_a_profile():
    """Until freeze_after rows, nothing is binned and frozen reads 0; then the label sets appear."""
    rec, registry = recorder(None, freeze_after=100, feature_types={"code": "categorical"})
    rng = np.random.default_rng(0)
    assert value(registry, "ml_drift_reference_frozen") == 0
    rec.observe_features(table({"x": rng.normal(size=60).tolist(), "code": [1, 2] * 30}))
    assert value(registry, "ml_drift_reference_frozen") == 0
    assert value(registry, "ml_drift_bin_total", feature="x", bin="b00") is None
    rec.observe_features(table({"x": rng.normal(size=60).tolist(), "code": [1, 2] * 30}))
    assert value(registry, "ml_drift_reference_frozen") == 1
    assert value(registry, "ml_drift_bin_total", feature="x", bin="b00") == 0
    assert value(registry, "ml_drift_reference_fraction", feature="code", bin="2") == 0.5
    rec.observe_features(table({"x": [0.0], "code": [2]}))
    assert value(registry, "ml_drift_bin_total", feature="code", bin="2") == 1
    assert rec.reference is not None
    assert [f.name for f in rec.reference.features] == ["x", "code"]


def test_outputs_freeze_on_their_own_when_the_profile_has_none():
    """A profile of inputs only: outputs collect their own reference; frozen waits for it."""
    rec, registry = recorder(reference({"x": UNIFORM[:100]}), freeze_after=50)
    rec.observe_outputs(Outputs(confidence=np.linspace(0, 1, 30)))
    assert value(registry, "ml_drift_reference_frozen") == 0
    rec.observe_outputs(Outputs(confidence=np.linspace(0, 1, 30)))
    assert value(registry, "ml_drift_reference_frozen") == 1
    assert value(registry, "ml_drift_bin_total", feature="__confidence__", bin="b00") == 0


def test_count_window_keeps_about_the_last_window_size_rows():
    """A 1,000-row window fed 500-row batches holds the last 1,000 rows (whole slots)."""
    rec, registry = recorder(reference({"x": UNIFORM}), window_size=1000)
    for _ in range(5):
        rec.observe_features(table({"x": [0.52] * 500}))
    assert value(registry, "ml_drift_window_rows", feature="x") == 1000
    assert value(registry, "ml_drift_bin_total", feature="x", bin="b10") == 2500


def test_time_window_forgets_rows_older_than_its_size():
    """A 60 s window: rows seen 100 s ago are out of the scores but still in the counters."""
    now = [0.0]
    registry = CollectorRegistry()
    rec = DriftRecorder(
        reference({"x": UNIFORM}),
        model_name="iris",
        model_version="1",
        settings=DriftSettings(window="time", window_size=60),
        clock=lambda: now[0],
    )
    registry.register(rec)
    rec.observe_features(table({"x": [0.1] * 300}))
    now[0] = 30.0
    rec.observe_features(table({"x": [0.92] * 200}))
    assert value(registry, "ml_drift_window_rows", feature="x") == 500
    now[0] = 100.0
    assert value(registry, "ml_drift_window_rows", feature="x") == 0
    assert math.isnan(number(registry, "ml_drift_score", feature="x", stat="psi"))
    assert value(registry, "ml_drift_bin_total", feature="x", bin="b18") == 200


def test_status_waits_for_min_window_rows():
    """A gross shift is not judged on 100 rows; at min_window rows it is critical."""
    rec, registry = recorder(reference({"x": UNIFORM}), min_window=300)
    rec.observe_features(table({"x": [0.97] * 100}))
    assert number(registry, "ml_drift_score", feature="x", stat="psi") > 1
    assert value(registry, "ml_drift_status", feature="x") == 0
    rec.observe_features(table({"x": [0.97] * 200}))
    assert value(registry, "ml_drift_status", feature="x") == 2
    assert value(registry, "ml_dataset_drift_share") == 1
    assert value(registry, "ml_dataset_drift") == 1


def test_noise_floor_shrinks_as_the_window_grows():
    """ml_drift_noise_floor reads the no-drift level for the current window size, at
    noise_alpha over the model's tests: one numeric feature makes 3 (psi, ks, wasserstein) in
    each of 2 windows, so KS's floor is Massart's bound at 0.01 / 6."""
    rec, registry = recorder(reference({"x": UNIFORM}))
    rec.observe_features(table({"x": np.linspace(0, 1, 500).tolist()}))
    small = number(registry, "ml_drift_noise_floor", feature="x", stat="ks")
    rec.observe_features(table({"x": np.linspace(0, 1, 1500).tolist()}))
    large = number(registry, "ml_drift_noise_floor", feature="x", stat="ks")
    c = np.sqrt(np.log(2 / (0.01 / 6)) / 2)
    assert small == pytest.approx(c * np.sqrt(1 / 500 + 1 / 20_001), rel=1e-9)
    assert large < small
    assert {"psi", "ks", "wasserstein"} <= stats_with_a_floor(registry)


def test_collect_on_another_thread_while_observing():
    """Scrapes from another thread during observation see consistent, growing counts."""
    rec, registry = recorder(reference({"x": UNIFORM, "y": UNIFORM}))
    batch = table({"x": np.linspace(0, 1, 200).tolist(), "y": np.linspace(0, 1, 200).tolist()})
    seen: list[float] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            total = sum(
                s.value
                for metric in registry.collect()
                for s in metric.samples
                if s.name == "ml_drift_bin_total" and s.labels["feature"] == "x"
            )
            seen.append(total)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    for _ in range(200):
        rec.observe_features(batch)
    stop.set()
    scraper.join()
    assert seen == sorted(seen)
    assert all(total % 200 == 0 for total in seen)
    assert value(registry, "ml_drift_pit_count", feature="y") == 200 * 200


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"warning_shift": 0.6, "critical_shift": 0.5}, "warning_shift <= critical_shift"),
        ({"psi_warning": 0.1}, "unknown field `psi_warning`"),
        ({"window": "weekly"}, "Invalid enum value 'weekly' - at `\\$.window`"),
        ({"min_window": 0}, "min_window must be at least 1"),
        ({"tresholds": 1}, "unknown field `tresholds`"),
        ({"feature_types": {"x": "text"}}, "Invalid enum value 'text'"),
    ],
)
def test_settings_reject_bad_values(config, message):
    """Config errors name the key and what was expected."""
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(config, DriftSettings)


def test_from_settings_loads_the_profile_file(tmp_path):
    """The profile path in the settings is loaded (and validated) once, at construction."""
    path = tmp_path / "profile.json"
    profiles.save(reference({"x": UNIFORM[:50]}), path)
    rec = DriftRecorder.from_settings(
        DriftSettings(profile=str(path)), model_name="iris", model_version="1"
    )
    assert rec.reference == profiles.load(path)
    with pytest.raises(profiles.ProfileError, match="cannot read profile"):
        DriftRecorder.from_settings(
            DriftSettings(profile=str(tmp_path / "none.json")), model_name="m", model_version="1"
        )
