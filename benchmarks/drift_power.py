"""Every figure docs/drift.md gives about drift detection, printed by the code that serves it.

    python benchmarks/drift_power.py                 # every section (a few minutes)
    python benchmarks/drift_power.py alarms detect   # some of them

Sections: `accuracy` (KS and Wasserstein against scipy), `floors` (noise floors and the level
they are taken at), `alarms` (no-drift windows that flag any feature of a 20-feature model, per
window size), `detect` (rows until a change is flagged, from a fresh sidecar and after a full
window), `severity` (the shift score on four shapes), `bins` (tied and integer features) and
`cost` (timings: the only figures that vary from run to run). Seeds are fixed, so every other
figure is the same on every run. Everything runs in process: the recorder is fed tables as the
pipeline feeds it, and read through a registry as a scrape reads it.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable, Mapping
from statistics import median

import numpy as np
from prometheus_client import CollectorRegistry
from scipy import stats

from sidecar.drift import floors, summary, verdict
from sidecar.drift import profile as profiles
from sidecar.drift import sketches as sk
from sidecar.drift.recorder import DriftRecorder
from sidecar.drift.settings import DriftSettings
from sidecar.extract.types import FeatureTable

Draw = Callable[[np.random.Generator, int], np.ndarray]


# --- the harness --------------------------------------------------------------------------------


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
    kinds: list[tuple[str, profiles.Kind]] = [(n, "numeric") for n in numeric]
    kinds += [(n, "categorical") for n in categorical or {}]
    return summary.build_from_batches(lambda: [(rows, columns)], kinds)


def table(numeric: Mapping[str, np.ndarray], text: Mapping[str, np.ndarray] | None = None):
    text = text or {}
    rows = len(next(iter({**numeric, **text}.values())))
    values = np.column_stack([*numeric.values(), *(np.full(rows, np.nan) for _ in text)])
    is_text = np.zeros(values.shape, bool)
    is_text[:, len(numeric) :] = True
    strings = {name: labels.astype(object) for name, labels in text.items()}
    missing = np.zeros(values.shape, bool)
    return FeatureTable((*numeric, *text), values, missing, is_text, strings)


def watch(profile: profiles.Profile, **settings: object) -> tuple[DriftRecorder, CollectorRegistry]:
    registry = CollectorRegistry()
    recorder = DriftRecorder(
        profile, model_name="m", model_version="1", settings=DriftSettings(**settings)
    )
    registry.register(recorder)
    return recorder, registry


def read(registry: CollectorRegistry, name: str, **labels: str) -> dict[str, float]:
    """One scrape's `name` samples matching `labels`, keyed by their last label."""
    found = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                found[list(s.labels.values())[-1]] = s.value
    return found


# --- accuracy -----------------------------------------------------------------------------------


def accuracy() -> None:
    print("## accuracy: 100,000-row N(0, 1) reference, 10 windows of 5,000 rows each")
    rng = np.random.default_rng(0)
    reference = rng.normal(size=100_000)
    profile = build({"x": reference})
    print(
        "| window | ks_2samp | sidecar KS | worst diff | W / sd (scipy) | sidecar | worst diff "
        "| sidecar PSI | worst PSI diff from textbook |"
    )
    for label, (mean, sd) in {
        "no shift": (0.0, 1.0),
        "mean + 0.1 sd": (0.1, 1.0),
        "mean + 0.3 sd": (0.3, 1.0),
        "mean + 1 sd": (1.0, 1.0),
        "sd x 1.5": (0.0, 1.5),
    }.items():
        rows = []
        for _ in range(10):
            window = rng.normal(mean, sd, 5000)
            recorder, registry = watch(profile, window_size=5000)
            recorder.observe_features(table({"x": window}))
            scores = read(registry, "ml_drift_score")
            counts = read(registry, "ml_drift_bin_total")
            shares = read(registry, "ml_drift_reference_fraction")
            p = np.array([counts[b] for b in shares]) / 5000
            q = np.array(list(shares.values()))
            textbook = float(np.sum((p - q) * np.log(np.maximum(p, 1e-4) / np.maximum(q, 1e-4))))
            rows.append(
                (
                    stats.ks_2samp(reference, window).statistic,
                    scores["ks"],
                    stats.wasserstein_distance(reference, window) / reference.std(),
                    scores["wasserstein"],
                    scores["psi"],
                    abs(scores["psi"] - textbook),
                )
            )
        a = np.array(rows)
        print(
            f"| {label} | {a[:, 0].mean():.4f} | {a[:, 1].mean():.4f} "
            f"| {np.abs(a[:, 0] - a[:, 1]).max():.4f} | {a[:, 2].mean():.4f} "
            f"| {a[:, 3].mean():.4f} | {np.abs(a[:, 2] - a[:, 3]).max():.4f} "
            f"| {a[:, 4].mean():.4f} | {a[:, 5].max():.1e} |"
        )


# --- floors -------------------------------------------------------------------------------------


def noise_floors() -> None:
    print("## floors: a model of 20 numeric features, reference of 20,000 rows")
    tests = 20 * len(verdict.NUMERIC_TESTS) * verdict.WINDOWS
    level = verdict.test_level(0.01, tests)
    print(f"tests per scrape: {tests}; each at noise_alpha / {tests} = {level:.2e}")
    rng = np.random.default_rng(1)
    normal = build({"x": rng.normal(size=20_000)}).features[0]
    assert isinstance(normal, profiles.NumericFeature)
    q = np.asarray(list(normal.fractions.values()))
    quantiles = np.interp(
        sk.CDF_LEVELS,
        np.column_stack((normal.cdf_below, normal.cdf_at)).ravel(),
        np.repeat(normal.cdf_x, 2),
    )
    spread = floors.wasserstein_spread(quantiles, normal.std or 1.0)
    print("| rows | PSI floor | (PSI at 0.01) | KS floor | Wasserstein floor (sd) |")
    for n in (100, 200, 500, 1000, 5000):
        psi = floors.psi_quantile(q, q * 20_000, 20_000, n, level)
        psi_one = floors.psi_quantile(q, q * 20_000, 20_000, n, 0.01)
        ks = floors.ks_floor(n, 20_000, level)
        w = floors.wasserstein_floor(n, 20_000, level, spread)
        print(f"| {n:,} | {psi:.3f} | {psi_one:.3f} | {ks:.3f} | {w:.3f} |")
    empty = 0.05 * np.log(0.05 / sk.EPS)
    print(
        f"cost of one empty bin of 5%: {empty:.2f}; P(a given 5% bin is empty at 100 rows) ="
        f" {0.95**100:.4f}"
    )


# --- false alarms -------------------------------------------------------------------------------

POPULATIONS: dict[str, Draw] = {
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
    shapes = list(POPULATIONS)
    numeric = {f"{shapes[i % 7]}_{i}": POPULATIONS[shapes[i % 7]](rng, rows) for i in range(17)}
    text = {f"colour_{i}": rng.choice(COLOURS, p=COLOUR_SHARES, size=rows) for i in range(3)}
    return table(numeric, text)


def alarms(windows: int = 400) -> None:
    print(
        f"## alarms: {windows} no-drift windows per size, 20 features (17 numeric of 7 shapes, "
        "3 categorical), judged from that size on (min_window)"
    )
    reference = mixed_window(np.random.default_rng(3), 20_000)
    profile = build(
        {name: reference.numeric[:, j] for j, name in enumerate(reference.columns[:17])},
        {name: reference.strings[name] for name in reference.columns[17:]},
    )
    print("| rows | windows flagging any feature | feature verdicts not ok |")
    for rows in (100, 200, 500, 1000, 2000, 5000):
        rng = np.random.default_rng(rows)
        recorder, registry = watch(profile, window_size=rows, min_window=rows)
        flagged = features = 0
        for _ in range(windows):
            recorder.observe_features(mixed_window(rng, rows))
            status = read(registry, "ml_drift_status")
            flagged += any(status.values())
            features += sum(v > 0 for v in status.values())
        print(
            f"| {rows:,} | {flagged} of {windows} ({flagged / windows:.2%}) "
            f"| {features} of {20 * windows} |"
        )


# --- detection ----------------------------------------------------------------------------------

NAMES = [f"f{i:02d}" for i in range(20)]


def twenty(rng: np.random.Generator, rows: int, change: str | None, size: float) -> np.ndarray:
    """19 normal features and a Poisson(4) one (sd 2, last); `change` acts on f07 or f19."""
    x = rng.normal(size=(rows, 20))
    x[:, 19] = rng.poisson(4, rows)
    if change == "shift":
        x[:, 7] += size
    elif change == "spread":
        x[:, 7] *= size
    elif change == "integer":
        x[:, 19] += size
    return x


def rows_to_flag(seed: int, change: str, size: float, full: bool) -> tuple[int | None, bool]:
    """Changed rows (batches of 100, default settings) until the changed feature is flagged;
    whether any other feature ever was."""
    rng = np.random.default_rng(seed)
    profile = build(dict(zip(NAMES, twenty(rng, 20_000, None, 0).T, strict=True)))
    recorder, registry = watch(profile)
    target = "f19" if change == "integer" else "f07"
    if full:
        for _ in range(10):
            batch = twenty(rng, 500, None, 0)
            recorder.observe_features(table(dict(zip(NAMES, batch.T, strict=True))))
    others = False
    for batch_number in range(1, 101):
        batch = twenty(rng, 100, change, size)
        recorder.observe_features(table(dict(zip(NAMES, batch.T, strict=True))))
        status = read(registry, "ml_drift_status")
        others |= any(v for name, v in status.items() if name != target)
        if status[target]:
            return batch_number * 100, others
    return None, others


def detect(seeds: int = 10) -> None:
    print(
        f"## detect: one of 20 features changes; batches of 100 rows, default settings; "
        f"{seeds} seeds"
    )
    print("| change | window | rows until flagged: median (min - max) | other features flagged |")
    for label, change, size in (
        ("mean + 0.3 sd", "shift", 0.3),
        ("mean + 0.5 sd", "shift", 0.5),
        ("sd x 1.5", "spread", 1.5),
        ("integer feature + 1 (0.5 sd)", "integer", 1.0),
    ):
        for full in (False, True):
            results = [rows_to_flag(seed, change, size, full) for seed in range(seeds)]
            found = [r for r, _ in results if r is not None]
            missed = sum(r is None for r, _ in results)
            spread = f"{median(found):,.0f} ({min(found):,} - {max(found):,})" if found else "-"
            if missed:
                spread += f", {missed} never within 10,000"
            window = "after 5,000 rows without drift" if full else "fresh sidecar"
            print(f"| {label} | {window} | {spread} | {sum(o for _, o in results)} of {seeds} |")


# --- severity -----------------------------------------------------------------------------------

SHAPES: dict[str, Draw] = {  # each with standard deviation 1
    "normal": lambda rng, k: rng.normal(size=k),
    "uniform": lambda rng, k: rng.random(k) * np.sqrt(12),
    "exponential": lambda rng, k: rng.exponential(size=k),
    "lognormal": lambda rng, k: rng.lognormal(0, 0.5, k) / np.sqrt(np.expm1(0.25) * np.e**0.25),
}


def severity() -> None:
    print("## severity: one 5,000-row window of each shape shifted by d sd; shift / PSI / status")
    rng = np.random.default_rng(6)
    profile = build({name: draw(rng, 20_000) for name, draw in SHAPES.items()})
    window = {name: draw(rng, 5000) for name, draw in SHAPES.items()}
    print("| d | " + " | ".join(SHAPES) + " |")
    for size in (0.1, 0.2, 0.3, 0.5, 1.0):
        recorder, registry = watch(profile, window_size=5000)
        recorder.observe_features(table({name: x + size for name, x in window.items()}))
        cells = []
        for name in SHAPES:
            scores = read(registry, "ml_drift_score", feature=name)
            status = read(registry, "ml_drift_status", feature=name)
            cells.append(f"{scores['shift']:.2f} / {scores['psi']:.2f} / {status[name]:.0f}")
        print(f"| {size} | " + " | ".join(cells) + " |")


# --- bins ---------------------------------------------------------------------------------------


def bins() -> None:
    print("## bins: reference values; bins made, and their smallest and largest share")
    rng = np.random.default_rng(8)
    for label, values in {
        "normal, 200,000 values (edges from a 20,000 sample)": rng.normal(size=200_000),
        "Poisson(30)": rng.poisson(30, 20_000).astype(float),
        "Poisson(4)": rng.poisson(4, 20_000).astype(float),
        "normal rounded to 0.1": np.round(rng.normal(size=20_000), 1),
        "60% zeros, then gamma": np.where(rng.random(20_000) < 0.6, 0.0, rng.gamma(2, size=20_000)),
    }.items():
        feature = build({"x": values}).features[0]
        assert isinstance(feature, profiles.NumericFeature)
        shares = np.asarray(list(feature.fractions.values()))[1:-3]
        print(
            f"| {label} | {shares.size} bins | {shares.min():.4f} - {shares.max():.3f} "
            f"| {np.unique(values).size} distinct values |"
        )


# --- cost ---------------------------------------------------------------------------------------


def cost() -> None:
    print("## cost (timeit on this machine: these vary from run to run)")
    rng = np.random.default_rng(9)
    names = [f"f{i:02d}" for i in range(20)]
    profile = build({name: rng.normal(size=20_000) for name in names})
    batches = [
        table(dict(zip(names, rng.normal(size=(1000, 20)).T, strict=True))) for _ in range(50)
    ]
    recorder, registry = watch(profile)
    turn = iter(range(10**9))

    def observe() -> None:
        recorder.observe_features(batches[next(turn) % len(batches)])
        recorder._flush()  # count now, not when the pool fills

    times = timeit.repeat(observe, number=1, repeat=200)
    print(
        f"observe_features, 1,000 rows x 20 numeric: best {min(times) * 1e3:.2f} ms, "
        f"median {median(times) * 1e3:.2f} ms"
    )
    mixed = mixed_window(rng, 20_000)
    mixed_recorder, _ = watch(
        build(
            {name: mixed.numeric[:, j] for j, name in enumerate(mixed.columns[:17])},
            {name: mixed.strings[name] for name in mixed.columns[17:]},
        )
    )
    mixed_batches = [mixed_window(rng, 1000) for _ in range(20)]

    def observe_mixed() -> None:
        mixed_recorder.observe_features(mixed_batches[next(turn) % len(mixed_batches)])
        mixed_recorder._flush()

    times = timeit.repeat(observe_mixed, number=1, repeat=100)
    print(
        f"observe_features, 1,000 rows x 17 numeric + 3 categorical: median "
        f"{median(times) * 1e3:.2f} ms"
    )
    for _ in range(30):
        list(registry.collect())  # every window size's PSI floor remembered
    times = timeit.repeat(lambda: list(registry.collect()), number=1, repeat=50)
    print(f"a scrape of 20 features, floors remembered: median {median(times) * 1e3:.1f} ms")
    growing, growing_registry = watch(profile)
    for _ in range(60):  # from empty to a full window and on, a scrape every 100 rows
        growing.observe_features(batches[next(turn) % len(batches)].rows(0, 100))
        list(growing_registry.collect())
    group = growing._inputs.group
    assert group is not None
    sizes = len(group.specs[0].psi_floors._known)
    print(f"window sizes one feature met from 0 to 6,000 rows (scrape every 100): {sizes}")
    q = np.asarray(list(profile.features[0].fractions.values()))
    times = timeit.repeat(
        lambda: floors.psi_quantile(q, q * 20_000, 20_000, 1000, 8.3e-5), number=1, repeat=20
    )
    print(f"one PSI floor (one feature, one window size): median {median(times) * 1e3:.1f} ms")


SECTIONS = {
    "accuracy": accuracy,
    "floors": noise_floors,
    "alarms": alarms,
    "detect": detect,
    "severity": severity,
    "bins": bins,
    "cost": cost,
}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    for name in chosen:
        SECTIONS[name]()
        print()
