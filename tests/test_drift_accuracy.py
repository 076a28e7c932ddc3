"""How well the sidecar's drift scores track the textbook statistics, and how it judges them:
no false alarms on windows drawn from the reference, quick detection of real shifts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from scipy import stats
from scipy.spatial.distance import jensenshannon

from sidecar.drift import profile as profiles
from sidecar.drift import summary
from sidecar.drift.recorder import DriftRecorder
from sidecar.drift.settings import DriftSettings
from sidecar.extract.types import FeatureTable

MODEL = {"model_name": "m", "model_version": "1"}


def build(
    numeric: Mapping[str, np.ndarray], categorical: Mapping[str, np.ndarray] | None = None
) -> profiles.Profile:
    rows = len(next(iter(numeric.values())))
    columns: dict[str, summary.Column] = {
        name: summary.NumericColumn(values, np.zeros(rows, bool))
        for name, values in numeric.items()
    }
    for name, labels in (categorical or {}).items():
        columns[name] = summary.CategoricalColumn(labels.astype(str), np.zeros(rows, bool))
    features = [(n, "numeric") for n in numeric] + [(n, "categorical") for n in categorical or {}]
    return summary.build_from_batches(lambda: [(rows, columns)], features)  # type: ignore[arg-type]


def numeric_table(
    columns: Mapping[str, np.ndarray],
    missing: np.ndarray | None = None,
    text: Mapping[str, np.ndarray] | None = None,
) -> FeatureTable:
    """Numeric columns, then text columns (cells that are strings, as extraction leaves them)."""
    text = text or {}
    rows = len(next(iter({**columns, **text}.values())))
    values = np.column_stack([*columns.values(), *(np.full(rows, np.nan) for _ in text)])
    gone = np.zeros(values.shape, bool) if missing is None else missing
    is_text = np.zeros(values.shape, bool)
    is_text[:, len(columns) :] = True
    strings = {name: labels.astype(object) for name, labels in text.items()}
    names = (*columns, *text)
    return FeatureTable(names, np.where(gone, np.nan, values), gone, is_text, strings)


def watch(profile: profiles.Profile, **settings: Any) -> tuple[DriftRecorder, CollectorRegistry]:
    registry = CollectorRegistry()
    rec = DriftRecorder(
        profile, model_name="m", model_version="1", settings=DriftSettings(**settings)
    )
    registry.register(rec)
    return rec, registry


def snapshot(registry: CollectorRegistry, name: str, label: str) -> dict[str, float]:
    """One scrape: `name` samples keyed by one label (reading many values per window)."""
    return {
        s.labels[label]: s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name == name
    }


@pytest.fixture(scope="module")
def normal_reference() -> tuple[np.ndarray, profiles.Profile]:
    """100,000 rows of N(0, 1): the reference the KS comparisons use."""
    x = np.random.default_rng(0).normal(size=100_000)
    return x, build({"x": x})


SHIFTS = {
    "no shift": (0.0, 1.0),
    "mean +0.1 sd": (0.1, 1.0),
    "mean +0.3 sd": (0.3, 1.0),
    "mean +1 sd": (1.0, 1.0),
    "sd x1.5": (0.0, 1.5),
}


@pytest.mark.parametrize(("mean", "sd"), SHIFTS.values(), ids=SHIFTS.keys())
def test_ks_is_within_002_of_scipy_ks_2samp(normal_reference, mean, sd):
    """Over a 5,000-row window the sidecar's KS is scipy's two-sample KS against the 100,000-row
    reference to within 0.02 (measured: within 0.002)."""
    reference, profile = normal_reference
    window = np.random.default_rng(1).normal(mean, sd, 5000)
    rec, registry = watch(profile, window_size=5000)
    rec.observe_features(numeric_table({"x": window}))
    ks = registry.get_sample_value("ml_drift_score", {**MODEL, "feature": "x", "stat": "ks"})
    assert ks == pytest.approx(stats.ks_2samp(reference, window).statistic, abs=0.02)
    wasserstein = registry.get_sample_value(
        "ml_drift_score", {**MODEL, "feature": "x", "stat": "wasserstein"}
    )
    expected = stats.wasserstein_distance(reference, window) / reference.std()
    assert wasserstein == pytest.approx(expected, rel=0.1, abs=0.01)


def test_binned_psi_js_linf_equal_the_textbook_formulas(normal_reference):
    """On the sidecar's own bins (counts and reference shares as exported), its PSI, JS and L-inf
    are the textbook formulas."""
    _, profile = normal_reference
    rec, registry = watch(profile, window_size=3000)
    rec.observe_features(numeric_table({"x": np.random.default_rng(2).normal(0.2, 1.1, 3000)}))
    counts = snapshot(registry, "ml_drift_bin_total", "bin")
    shares = snapshot(registry, "ml_drift_reference_fraction", "bin")
    scores = snapshot(registry, "ml_drift_score", "stat")
    p = np.array([counts[b] for b in shares]) / 3000
    q = np.array(list(shares.values()))
    used = (p > 0) & (q > 0)  # the bins where the textbook formula is defined
    assert used.sum() >= 20
    assert p[~used].sum() == 0 == q[~used].sum()
    assert scores["psi"] == pytest.approx(
        np.sum((p - q)[used] * np.log(p[used] / q[used])), rel=1e-9
    )
    assert scores["js"] == pytest.approx(jensenshannon(p, q, base=2) ** 2, rel=1e-9)
    assert scores["linf"] == pytest.approx(np.max(np.abs(p - q)), rel=1e-12)


def test_windows_drawn_from_the_reference_are_ok_in_99_percent():
    """200 windows of 1,000 rows resampled from the reference, five kinds of feature: at most 1%
    of (window, feature) verdicts are anything but ok."""
    rng = np.random.default_rng(3)
    n = 20_000
    data = {
        "normal": rng.normal(size=n),
        "skewed": rng.lognormal(size=n),
        "counts": rng.poisson(2, n).astype(float),
        "zero_inflated": np.where(rng.random(n) < 0.6, 0.0, rng.gamma(2, size=n)),
    }
    colour = rng.choice(["red", "green", "blue", "grey"], p=[0.5, 0.3, 0.15, 0.05], size=n)
    rec, registry = watch(build(data, {"colour": colour}), window_size=1000)
    verdicts: list[float] = []
    for _ in range(200):
        rows = rng.integers(0, n, 1000)
        window = numeric_table({k: v[rows] for k, v in data.items()}, text={"colour": colour[rows]})
        rec.observe_features(window)
        verdicts.extend(snapshot(registry, "ml_drift_status", "feature").values())
    assert len(verdicts) == 200 * 5
    assert np.mean(np.array(verdicts) == 0) >= 0.99


def test_half_sd_shift_on_one_of_twenty_features_is_flagged_within_2000_rows():
    """Batches of 100 rows; feature f07 is shifted by 0.5 sd. It is flagged by 2,000 rows and
    the other 19 never are."""
    rng = np.random.default_rng(4)
    names = [f"f{i:02d}" for i in range(20)]
    rec, registry = watch(build({name: rng.normal(size=20_000) for name in names}))
    flagged_at = None
    for batch in range(1, 21):
        rows = rng.normal(size=(100, 20))
        rows[:, 7] += 0.5
        rec.observe_features(numeric_table(dict(zip(names, rows.T, strict=True))))
        status = snapshot(registry, "ml_drift_status", "feature")
        assert all(status[name] == 0 for name in names if name != "f07")
        if flagged_at is None and status["f07"] > 0:
            flagged_at = batch * 100
    assert flagged_at is not None
    assert flagged_at <= 2000
    share = registry.get_sample_value("ml_dataset_drift_share", MODEL)
    assert share == pytest.approx(1 / 20)


def test_a_jump_in_missing_share_is_flagged():
    """A feature never missing in the reference, missing in 10% of a 1,000-row window: critical."""
    rng = np.random.default_rng(5)
    rec, registry = watch(build({"x": rng.normal(size=20_000)}), window_size=1000)
    missing = (rng.random(1000) < 0.1)[:, None]
    rec.observe_features(numeric_table({"x": rng.normal(size=1000)}, missing=missing))
    assert registry.get_sample_value("ml_drift_status", {**MODEL, "feature": "x"}) == 2
    assert (
        registry.get_sample_value("ml_drift_bin_total", {**MODEL, "feature": "x", "bin": "missing"})
        == missing.sum()
    )


def test_an_unseen_category_is_flagged():
    """15% of a window in a category the reference never had: critical, counted as unseen."""
    rng = np.random.default_rng(6)
    reference = rng.choice(["a", "b", "c"], size=20_000)
    rec, registry = watch(build({"x": rng.normal(size=20_000)}, {"c": reference}), window_size=1000)
    labels = np.where(rng.random(1000) < 0.15, "new", rng.choice(["a", "b", "c"], size=1000))
    rec.observe_features(numeric_table({"x": rng.normal(size=1000)}, text={"c": labels}))
    assert registry.get_sample_value("ml_drift_status", {**MODEL, "feature": "c"}) == 2
    assert registry.get_sample_value("ml_drift_status", {**MODEL, "feature": "x"}) == 0
    unseen = registry.get_sample_value(
        "ml_drift_bin_total", {**MODEL, "feature": "c", "bin": "unseen"}
    )
    assert unseen == (labels == "new").sum()
