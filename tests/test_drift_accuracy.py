"""How well the sidecar's drift scores track the textbook statistics, and how it judges them:
no false alarms on windows drawn from the reference, quick detection of real shifts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


Draw = Callable[[np.random.Generator, int], np.ndarray]

POPULATIONS: dict[str, Draw] = {  # 17 numeric features of seven shapes, and 3 categorical ones
    "normal": lambda rng, k: rng.normal(size=k),
    "lognormal": lambda rng, k: rng.lognormal(size=k),
    "poisson2": lambda rng, k: rng.poisson(2, k).astype(float),
    "poisson30": lambda rng, k: rng.poisson(30, k).astype(float),
    "zeroinflated": lambda rng, k: np.where(rng.random(k) < 0.6, 0.0, rng.gamma(2, size=k)),
    "uniform": lambda rng, k: rng.random(k),
    "exponential": lambda rng, k: rng.exponential(size=k),
}
COLOURS, COLOUR_SHARES = ["red", "green", "blue", "grey", "pink"], [0.4, 0.3, 0.2, 0.08, 0.02]


def mixed_window(rng: np.random.Generator, rows: int) -> FeatureTable:
    """`rows` fresh rows of the 20-feature population (not resampled from the reference)."""
    shapes = list(POPULATIONS)
    numeric = {f"{shapes[i % 7]}_{i}": POPULATIONS[shapes[i % 7]](rng, rows) for i in range(17)}
    text = {f"colour_{i}": rng.choice(COLOURS, p=COLOUR_SHARES, size=rows) for i in range(3)}
    return numeric_table(numeric, text=text)


@pytest.fixture(scope="module")
def mixed_profile() -> profiles.Profile:
    table = mixed_window(np.random.default_rng(3), 20_000)
    numeric = {name: table.numeric[:, j] for j, name in enumerate(table.columns[:17])}
    return build(numeric, {name: table.strings[name] for name in table.columns[17:]})


@pytest.mark.parametrize("rows", [100, 300, 1000, 5000])
def test_no_drift_window_flags_any_of_twenty_features_in_at_most_one_percent(mixed_profile, rows):
    """150 windows of fresh no-drift rows per size, judged from `rows` rows on (min_window):
    the share of windows that flag any of the 20 features (17 numeric of seven shapes, three
    categorical) is at most noise_alpha = 1%, however small the window."""
    rng = np.random.default_rng(rows)
    rec, registry = watch(mixed_profile, window_size=rows, min_window=rows)
    flagged = 0
    for _ in range(150):
        rec.observe_features(mixed_window(rng, rows))
        flagged += any(snapshot(registry, "ml_drift_status", "feature").values())
    assert set(snapshot(registry, "ml_drift_window_rows", "feature").values()) == {rows}
    assert flagged <= 1


def twenty_features(rng: np.random.Generator, rows: int, change: str | None = None) -> np.ndarray:
    """19 normal features and an integer one (Poisson(4), sd 2, last); `change` moves f07 by
    0.5 sd or widens it 1.5 times, or adds 1 (0.5 sd) to the integer feature."""
    x = rng.normal(size=(rows, 20))
    x[:, 19] = rng.poisson(4, rows)
    if change == "shift":
        x[:, 7] += 0.5
    elif change == "spread":
        x[:, 7] *= 1.5
    elif change == "integer":
        x[:, 19] += 1
    return x


NAMES = [f"f{i:02d}" for i in range(20)]


@pytest.mark.parametrize(
    ("change", "feature"), [("shift", "f07"), ("spread", "f07"), ("integer", "f19")]
)
def test_a_change_after_a_full_window_is_flagged_within_1000_rows(change, feature):
    """5,000 rows without drift fill the window (default settings), then batches of 100 changed
    rows: the changed feature is flagged within 1,000 of them, the other 19 never are."""
    rng = np.random.default_rng(4)
    rec, registry = watch(build(dict(zip(NAMES, twenty_features(rng, 20_000).T, strict=True))))
    for _ in range(10):  # one window slot at a time, as traffic fills it
        rows = twenty_features(rng, 500)
        rec.observe_features(numeric_table(dict(zip(NAMES, rows.T, strict=True))))
    assert not any(snapshot(registry, "ml_drift_status", "feature").values())
    flagged_at = None
    for batch in range(1, 11):
        rows = twenty_features(rng, 100, change)
        rec.observe_features(numeric_table(dict(zip(NAMES, rows.T, strict=True))))
        status = snapshot(registry, "ml_drift_status", "feature")
        assert [name for name in NAMES if status[name] and name != feature] == []
        if flagged_at is None and status[feature] > 0:
            flagged_at = batch * 100
    assert flagged_at is not None
    share = registry.get_sample_value("ml_dataset_drift_share", MODEL)
    assert share == pytest.approx(1 / 20)


def test_half_sd_shift_is_flagged_as_soon_as_a_fresh_sidecar_judges():
    """From a fresh sidecar, in batches of 100 rows, a 0.5 sd shift of one of 20 features is
    flagged at min_window (500) rows, the first window judged."""
    rng = np.random.default_rng(5)
    rec, registry = watch(build(dict(zip(NAMES, twenty_features(rng, 20_000).T, strict=True))))
    for _ in range(5):
        rows = twenty_features(rng, 100, "shift")
        rec.observe_features(numeric_table(dict(zip(NAMES, rows.T, strict=True))))
    status = snapshot(registry, "ml_drift_status", "feature")
    assert [name for name in NAMES if status[name]] == ["f07"]


SHAPES: dict[str, Draw] = {
    "normal": lambda rng, k: rng.normal(size=k),
    "uniform": lambda rng, k: rng.random(k) * np.sqrt(12),
    "exponential": lambda rng, k: rng.exponential(size=k),
    "lognormal": lambda rng, k: rng.lognormal(0, 0.5, k) / np.sqrt(np.expm1(0.25) * np.e**0.25),
}  # each with standard deviation 1, so a shift by d moves it d standard deviations


def test_severity_ranks_shifts_the_same_on_every_feature_type():
    """Shifts of 0.1, 0.2, 0.3 and 0.5 sd on four shapes (two bounded, two long-tailed) of one
    5,000-row window: the shift score reads each within 0.05 of its size (the window's and the
    reference's own noise), so a smaller shift never outranks a larger one on another feature.
    PSI, whose empty tail bins cost what the 1e-4 floor makes them, ranks them otherwise."""
    rng = np.random.default_rng(6)
    profile = build({name: draw(rng, 20_000) for name, draw in SHAPES.items()})
    window = {name: draw(rng, 5000) for name, draw in SHAPES.items()}
    readings: dict[tuple[str, float], tuple[float, float]] = {}
    for size in (0.1, 0.2, 0.3, 0.5):
        rec, registry = watch(profile, window_size=5000)
        rec.observe_features(numeric_table({name: x + size for name, x in window.items()}))
        for name in SHAPES:
            scores = {
                s.labels["stat"]: s.value
                for metric in registry.collect()
                for s in metric.samples
                if s.name == "ml_drift_score" and s.labels["feature"] == name
            }
            readings[name, size] = (scores["shift"], scores["psi"])
    for (name, size), (shift, _) in readings.items():
        assert shift == pytest.approx(size, abs=0.05), name
    by_shift = sorted(readings, key=lambda k: readings[k][0])
    assert [size for _, size in by_shift] == sorted(size for _, size in by_shift)
    by_psi = sorted(readings, key=lambda k: readings[k][1])
    assert [size for _, size in by_psi] != sorted(size for _, size in by_psi)


def test_a_jump_in_missing_share_is_flagged():
    """A feature never missing in the reference, missing in 10% of a 1,000-row window: flagged,
    as a warning, since moving 10% of the rows reads as a 0.25 sd shift."""
    rng = np.random.default_rng(5)
    rec, registry = watch(build({"x": rng.normal(size=20_000)}), window_size=1000)
    missing = (rng.random(1000) < 0.1)[:, None]
    rec.observe_features(numeric_table({"x": rng.normal(size=1000)}, missing=missing))
    assert registry.get_sample_value("ml_drift_status", {**MODEL, "feature": "x"}) == 1
    shift = registry.get_sample_value("ml_drift_score", {**MODEL, "feature": "x", "stat": "shift"})
    assert shift == pytest.approx(2 * stats.norm.ppf((1 + missing.mean()) / 2))
    assert (
        registry.get_sample_value("ml_drift_bin_total", {**MODEL, "feature": "x", "bin": "missing"})
        == missing.sum()
    )


def test_an_unseen_category_is_flagged():
    """15% of a window in a category the reference never had: flagged (a warning: moving 15%
    of the rows reads as a 0.38 sd shift), counted as unseen."""
    rng = np.random.default_rng(6)
    reference = rng.choice(["a", "b", "c"], size=20_000)
    rec, registry = watch(build({"x": rng.normal(size=20_000)}, {"c": reference}), window_size=1000)
    labels = np.where(rng.random(1000) < 0.15, "new", rng.choice(["a", "b", "c"], size=1000))
    rec.observe_features(numeric_table({"x": rng.normal(size=1000)}, text={"c": labels}))
    assert registry.get_sample_value("ml_drift_status", {**MODEL, "feature": "c"}) == 1
    assert registry.get_sample_value("ml_drift_status", {**MODEL, "feature": "x"}) == 0
    unseen = registry.get_sample_value(
        "ml_drift_bin_total", {**MODEL, "feature": "c", "bin": "unseen"}
    )
    assert unseen == (labels == "new").sum()
