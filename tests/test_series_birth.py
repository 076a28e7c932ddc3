"""Every count reaches Prometheus whatever the timing of its first scrape (issue #18, item 1).

Prometheus takes a series' first sample as its starting point: counts made before it never show
in increase(). So a Prometheus scrape is shown each new counter and histogram series at 0 the
first time it finds it (sidecar.recorders.labels.SeriesBirths), and the true value from the next.

The end-to-end test runs two sidecars and a real Prometheus with no warm-up request: a burst of
rows for a model named by the request path, and one bulk /feedback call, both before Prometheus
starts. The fleet's recording rules must then equal the textbook statistics (scipy) on the union
of the two sidecars' rows, up to what increase()'s extrapolation allows.
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from scipy import stats
from scipy.spatial.distance import jensenshannon

from sidecar.demo.model import CLASSES, FEATURES, predict_proba, sample_rows
from sidecar.drift import profile as profiles
from sidecar.drift import sketches as sk
from sidecar.recorders.labels import SeriesBirths
from tests.prometheus_stack import (
    PROMETHEUS_DIR,
    Prometheus,
    running,
    scrape_target,
    send,
    start_model,
    start_prometheus,
    start_sidecar,
    write_prometheus_config,
)

# --- the mechanism ------------------------------------------------------------------------------

Seen = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Scraper:
    """Prometheus scrapes through one SeriesBirths, on a clock the test moves."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.now = 0.0
        self.births = SeriesBirths(registry, clock=lambda: self.now)

    def at(self, now: float) -> Seen:
        self.now = now
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in self.births.scrape().collect()
            for s in metric.samples
        }


IRIS = (("model", "iris"),)


def test_a_series_counted_before_its_first_scrape_reads_zero_then_its_count():
    """Counter and histogram read 0 to scrapes every 15 s until twice that has passed, then
    every count; a gauge reads as it is; `_created` keeps the series' birth time."""
    registry = CollectorRegistry()
    rows = Counter("rows", "Rows.", ["model"], registry=registry)
    sizes = Histogram("size", "Sizes.", ["model"], buckets=(1, 10), registry=registry)
    Gauge("share", "A share.", registry=registry).set(0.25)
    rows.labels("iris").inc(2000)
    sizes.labels("iris").observe(5)
    scraper = Scraper(registry)
    first, second, third = scraper.at(0), scraper.at(15), scraper.at(30)
    for seen in (first, second):
        assert seen[("rows_total", IRIS)] == 0
        assert seen[("size_count", IRIS)] == seen[("size_sum", IRIS)] == 0
        assert seen[("size_bucket", (("le", "10.0"), *IRIS))] == 0
    assert first[("share", ())] == 0.25
    assert first[("rows_created", IRIS)] == third[("rows_created", IRIS)] > 0
    assert third[("rows_total", IRIS)] == 2000
    assert third[("size_sum", IRIS)] == 5
    assert third[("size_bucket", (("le", "10.0"), *IRIS))] == 1


def test_a_series_born_later_waits_for_its_own_zero():
    """A label set that appears between scrapes (a new model, a confusion-matrix cell) gets its
    own zeros; the series Prometheus has seen counting keep counting."""
    registry = CollectorRegistry()
    rows = Counter("rows", "Rows.", ["model"], registry=registry)
    rows.labels("iris").inc(3)
    scraper = Scraper(registry)
    for t in (0, 10, 20):
        scraper.at(t)
    rows.labels("iris").inc(4)
    rows.labels("wine").inc(5)
    seen = scraper.at(30)
    assert seen[("rows_total", IRIS)] == 7
    assert seen[("rows_total", (("model", "wine"),))] == 0
    assert [scraper.at(t)[("rows_total", (("model", "wine"),))] for t in (40, 50)] == [0, 5]


@pytest.mark.parametrize("phase", [0.5, 3.0, 7.5, 14.5])
def test_two_scrapers_of_one_interval_both_see_the_zero_whatever_their_phases(phase):
    """A Prometheus HA pair (or one sidecar in two jobs) scraping every 15 s, the second
    `phase` seconds after the first, a series born before either: each sees it at 0 before it
    sees its count."""
    registry = CollectorRegistry()
    Counter("rows", "Rows.", registry=registry).inc(8)
    scraper = Scraper(registry)
    seen: dict[str, list[float]] = {"a": [], "b": []}
    scrapes = sorted(
        [(15.0 * k, "a") for k in range(8)] + [(15.0 * k + phase, "b") for k in range(8)]
    )
    for t, who in scrapes:
        seen[who].append(scraper.at(t)[("rows_total", ())])
    for values in seen.values():
        assert values[0] == 0
        assert values[-1] == 8


def test_one_late_scrape_does_not_hold_new_series_back_for_long():
    """After a 10-minute gap (Prometheus was down), a new series still counts within three 15 s
    scrapes: the hold follows the usual gap, not the longest."""
    registry = CollectorRegistry()
    rows = Counter("rows", "Rows.", ["model"], registry=registry)
    scraper = Scraper(registry)
    times = [15.0 * k for k in range(8)] + [600.0 + 15.0 * k for k in range(4)]
    for t in times[:9]:
        scraper.at(t)
    rows.labels("wine").inc(5)
    assert [scraper.at(t)[("rows_total", (("model", "wine"),))] for t in times[9:]] == [0, 0, 5]


def test_the_registry_itself_is_untouched():
    """What is held back is what a Prometheus scrape is shown, not the counts: the registry
    (what anything else scrapes, and worker snapshots read) always has the true value."""
    registry = CollectorRegistry()
    Counter("rows", "Rows.", registry=registry).inc(9)
    Scraper(registry).at(0)
    assert registry.get_sample_value("rows_total") == 9


# --- two sidecars and Prometheus, no warm-up ---------------------------------------------------

ROWS = 2500  # per sidecar, all before Prometheus first scrapes
BATCH = 100
SHIFT = 0.3  # sepal_length moves by this: a modest drift, so the statistics are not all 0
SAMPLES = 11  # scrapes of every series before the rules are read
# increase() stretches a series' growth from its samples' span to the evaluation time: by a
# factor f in [1, 1 + 1.1 / (SAMPLES - 1)] (see tests/test_drift_replicas.py).
STRETCH = 1 + 1.1 / (SAMPLES - 1)
RULES = ("drift_rules.yml", "feedback_rules.yml")


def jittered(rows: list[list[float]], rng: random.Random) -> list[list[float]]:
    """sample_rows rounds to 0.01; noise within the rounding makes the values continuous, so
    the PIT has no atoms to randomise and the expected KS is exact."""
    return [[value + rng.uniform(-0.005, 0.005) for value in row] for row in rows]


def build_profile(tmp: Path) -> tuple[Path, np.ndarray]:
    rng = random.Random(1)
    rows = jittered(sample_rows(rng, 5000), rng)
    predicted = predict_proba(np.asarray(rows)).argmax(axis=1)
    data = tmp / "reference.csv"
    with data.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([*FEATURES, "predicted"])
        writer.writerows([*row, CLASSES[k]] for row, k in zip(rows, predicted, strict=True))
    profile = tmp / "profile.json"
    build = [sys.executable, "-m", "sidecar", "profile", "build", str(data), "-o", str(profile)]
    result = subprocess.run(
        [*build, "--class-column", "predicted", "--quiet"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return profile, np.asarray(rows)


def sidecar_config(upstream: str, profile: Path, store: Path) -> dict[str, Any]:
    """The model is named by the path (/v1/models/iris:predict), not the configured `default`:
    its series are born with the burst."""
    return {
        "upstream": upstream,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "preset": "kserve-v1",
        "health_path": "/v2/health/ready",
        "model_name": "default",
        "model_version": "1",
        "mapping": {"class_names": list(CLASSES), "feature_names": list(FEATURES)},
        "drift": {"profile": str(profile)},
        "feedback": {"store": str(store)},
    }


class Burst:
    """What one sidecar was sent: its rows, and per row the confidence and whether the label
    posted for it is the predicted class."""

    def __init__(self) -> None:
        self.rows: list[list[float]] = []
        self.confidence: list[float] = []
        self.correct: list[bool] = []


def send_burst(proxy: str, admin: str, seed: int) -> Burst:
    """ROWS rows in requests of BATCH, then one /feedback call labelling every row: the
    predicted class, but another one for every fourth row."""
    rng = random.Random(seed)
    burst = Burst()
    labels = []
    for _ in range(ROWS // BATCH):
        rows = jittered(sample_rows(rng, BATCH, SHIFT), rng)
        reply = send(f"{proxy}/v1/models/iris:predict", {"instances": rows})
        assert reply.status == 200
        request_id = reply.headers["X-Request-ID"]
        for row, probabilities in enumerate(json.loads(reply.body)["predictions"]):
            predicted = int(np.argmax(probabilities))
            truth = predicted if rng.randrange(4) else (predicted + 1) % len(CLASSES)
            labels.append({"request_id": request_id, "row": row, "label": CLASSES[truth]})
            burst.confidence.append(max(probabilities))
            burst.correct.append(truth == predicted)
        burst.rows += rows
    until_logged(admin, ROWS)
    reply = send(f"{admin}/feedback", labels)
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["matched"] == ROWS
    return burst


def until_logged(admin: str, rows: int) -> None:
    """Poll the sidecar's own /metrics (not a Prometheus scrape: it sees the true values and
    uses up no series' zero) until the prediction log has written `rows` rows."""

    def written() -> bool:
        with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("sidecar_prediction_log_written_total "):
                return float(line.split()[1]) >= rows
        return False

    deadline = time.monotonic() + 60
    while not written():
        assert time.monotonic() < deadline, "the prediction log did not write the burst"
        time.sleep(0.1)


def rules_every_second(tmp: Path) -> list[Path]:
    """The rule files as shipped, with every group on the global 1 s interval."""
    paths = []
    for name in RULES:
        document = yaml.safe_load((PROMETHEUS_DIR / "rules" / name).read_text())
        for group in document["groups"]:
            group.pop("interval", None)
        path = tmp / name
        path.write_text(yaml.safe_dump(document))
        paths.append(path)
    return paths


class Fleet:
    """The running stack, what each sidecar was sent, and the reference (rows and profile)."""

    def __init__(
        self,
        prometheus: Prometheus,
        bursts: list[Burst],
        reference: np.ndarray,
        profile: profiles.Profile,
    ) -> None:
        self.prometheus, self.bursts = prometheus, bursts
        self.reference, self.profile = reference, profile


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("births")
    profile, reference = build_profile(tmp)
    with running() as processes:
        upstream = start_model(tmp, processes)
        urls = [
            start_sidecar(
                tmp, sidecar_config(upstream, profile, tmp / f"{name}.db"), processes, name
            )
            for name in ("a", "b")
        ]
        bursts = [send_burst(u["proxy"], u["admin"], seed) for seed, u in enumerate(urls)]
        targets = [{"targets": [scrape_target(u["admin"]) for u in urls]}]
        config = write_prometheus_config(
            tmp, rules_every_second(tmp), [{"job_name": "sidecar", "static_configs": targets}]
        )
        prometheus = start_prometheus(tmp, config, processes)
        prometheus.wait_until(
            f"min(count_over_time(ml_labelled_total[1h])) >= {SAMPLES}", f"{SAMPLES} scrapes"
        )
        # Rules evaluate every second: once the first rule has a sample two seconds past now,
        # every rule of every group has evaluated at least once since the scrapes above.
        now = time.time() + 2
        prometheus.wait_until(
            f"min(timestamp(model_feature_bin:ml_drift_reference_fraction:max)) > {now:.3f}",
            "two rule evaluations",
        )
        yield Fleet(prometheus, bursts, reference, profiles.load(profile))


def one(prometheus: Prometheus, expr: str) -> float:
    found = prometheus.vector(expr)
    assert len(found) == 1, (expr, found)
    return float(found[0]["value"][1])


def mixtures(
    a: np.ndarray, b: np.ndarray, weight_a: float, weight_b: float
) -> Iterator[np.ndarray]:
    """The shares increase() may weigh A's and B's rows into: A's counts stretched by f_A and
    B's by f_B, both in [1, STRETCH]: a mixture w A + (1 - w) B, w in a small interval."""
    lowest = weight_a / (weight_a + weight_b * STRETCH)
    highest = weight_a * STRETCH / (weight_a * STRETCH + weight_b)
    for w in np.linspace(lowest, highest, 101):
        yield w * a + (1 - w) * b


def assert_within(
    recorded: float, statistic: Callable[[np.ndarray], float], parts: list[np.ndarray]
):
    """`recorded` lies where `statistic` of the mixtures of the two sidecars' shares lies."""
    values = [statistic(p) for p in mixtures(parts[0], parts[1], ROWS, ROWS)]
    assert min(values) - 1e-9 <= recorded <= max(values) + 1e-9, (
        recorded,
        min(values),
        max(values),
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_row_of_a_burst_before_the_first_scrape_is_counted(fleet: Fleet) -> None:
    """Each sidecar's counters hold its burst, and the fleet's 1h row count holds both bursts
    (stretched by increase() by at most one scrape interval over the samples' span)."""
    p = fleet.prometheus
    for feature in FEATURES:
        per_instance = p.vector(
            f'sum by (instance) (ml_drift_bin_total{{model_name="iris", feature="{feature}"}})'
        )
        assert sorted(float(s["value"][1]) for s in per_instance) == [ROWS, ROWS]
        count = one(p, f'model_feature:ml_drift_count:1h{{model_name="iris", feature="{feature}"}}')
        assert 2 * ROWS <= count <= 2 * ROWS * STRETCH


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("feature", FEATURES)
def test_fleet_drift_rules_equal_scipy_on_the_union_of_rows(fleet: Fleet, feature: str) -> None:
    """PSI, JS and L-inf of the fleet's bins, and KS of its PIT buckets, are the textbook values
    of the union of both bursts (scipy's Jensen-Shannon and two-sample KS), up to the unequal
    weighting increase()'s extrapolation allows."""
    p, j = fleet.prometheus, FEATURES.index(feature)
    found = next(f for f in fleet.profile.features if f.name == feature)
    assert isinstance(found, profiles.NumericFeature)
    q = np.asarray(list(found.fractions.values()))
    points = sk.search_points(np.asarray(found.edges))
    values = [np.asarray(b.rows)[:, j] for b in fleet.bursts]
    shares = [
        np.bincount(sk.numeric_codes(v, np.zeros(v.size, bool), points), minlength=q.size) / v.size
        for v in values
    ]
    selector = f'{{model_name="iris", feature="{feature}"}}'
    union = np.concatenate(values)
    union_shares = (
        np.bincount(sk.numeric_codes(union, np.zeros(union.size, bool), points), minlength=q.size)
        / union.size
    )
    textbook: dict[str, Callable[[np.ndarray], float]] = {
        "psi": lambda s: float(np.sum((s - q) * np.log(np.maximum(s, 1e-4) / np.maximum(q, 1e-4)))),
        "js": lambda s: float(jensenshannon(s, q, base=2) ** 2),
        "linf": lambda s: float(np.max(np.abs(s - q))),
    }
    for stat, formula in textbook.items():
        recorded = one(p, f"model_feature:ml_drift_{stat}:1h{selector}")
        assert_within(recorded, formula, shares)
        assert recorded == pytest.approx(formula(union_shares), rel=0.05, abs=1e-3)
    cdf = sk.make_cdf(*(np.asarray(v) for v in (found.cdf_x, found.cdf_below, found.cdf_at)))
    le = np.asarray(sk.PIT_BUCKETS[:-1])
    pit = [np.mean(sk.pit(v, cdf, np.random.default_rng(0))[:, None] <= le, axis=0) for v in values]
    recorded_ks = one(p, f"model_feature:ml_drift_ks:1h{selector}")
    assert_within(recorded_ks, lambda cdf_at_le: float(np.max(np.abs(cdf_at_le - le))), pit)
    exact = stats.ks_2samp(fleet.reference[:, j], union).statistic
    assert recorded_ks == pytest.approx(exact, abs=0.02)  # 20 buckets read D on a coarse grid


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_bulk_feedback_call_before_the_first_scrape_counts(fleet: Fleet) -> None:
    """The confusion-matrix cells and CBPE counters, born with the burst and the labels, give
    the fleet's labelled rows, accuracy and expected accuracy over the union of both sidecars'
    rows."""
    p = fleet.prometheus
    labelled = one(p, 'model:ml_labelled:increase1h{model_name="iris"}')
    assert 2 * ROWS <= labelled <= 2 * ROWS * STRETCH
    accuracy = [np.asarray([np.mean(b.correct)]) for b in fleet.bursts]
    assert_within(one(p, 'model:ml_accuracy:ratio1h{model_name="iris"}'), first, accuracy)
    expected = [np.asarray([np.mean(b.confidence)]) for b in fleet.bursts]
    assert_within(one(p, 'model:ml_expected_accuracy:ratio1h{model_name="iris"}'), first, expected)


def first(values: np.ndarray) -> float:
    return float(values[0])
