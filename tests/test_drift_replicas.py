"""Two sidecars fed the halves of a stream give, through Prometheus's drift rules, the scores of one
sidecar fed the whole stream (issue #4).

Three sidecars share one reference profile: A gets the first half of a deterministic stream, B the
second half, C all of it. A real Prometheus scrapes them with a `fleet` target label and
evaluates deploy/prometheus/rules/drift_rules.yml as shipped. The rules aggregate
`without (instance, pod)`, so the label keeps fleets apart: A and B merge into fleet "ab", C is
fleet "c"; A and B are also scraped alone, as fleets "a" and "b".

What is exact, and what is not:

- The counters are. Every sidecar counts into the profile's bins and PIT cells, so A's counts plus
  B's are C's, bin for bin, to the unit.
- A fleet of one target gets exact shares. increase() over a series younger than its window
  scales it by f = (t_eval - t_first) / (t_last - t_first): Prometheus extrapolates from the last
  scrape to the evaluation time, and not backwards from the first scrape, because that one saw the
  series at 0 (the sidecar shows every new series at 0 to its first Prometheus scrape, so no
  warm-up request is needed, whenever the rows come). One scrape writes all of a target's series
  at one time, so f is the same for all of them and cancels in every share: fleets "c", "a" and
  "b" have the exact shares of C, A and B.
- Fleet "ab" does not, to a bound. Prometheus scrapes each target at its own phase, so f_A != f_B,
  and the merged shares are those of the mixture w A + (1 - w) B with w = f_A / (f_A + f_B), not
  1/2. Prometheus extrapolates by less than 1.1 average scrape intervals, so with n samples in the
  window f - 1 < 1.1 / (n - 1) and |w - 1/2| < 1.1 / (4 (n - 1)). PSI, JS, L-inf and KS are convex
  in the shares, so along the mixture g(w): |g(w) - g(1/2)| <= 2 |w - 1/2| max(|g(1) - g(1/2)|,
  |g(0) - g(1/2)|), and g(1), g(1/2), g(0) are fleets "a", "c" and "b". That is the tolerance.
  (PSI's floor of 1e-4 bends it where a share drops below 1e-4, only in a bin with a row or two in
  one half and none in the other, near an end of the mixture: far too little to matter.)
- Drift grows along the stream, so the halves score far apart and the tolerance is a small part of
  what a wrong merge (one replica's scores, or their average) would miss by.
"""

from __future__ import annotations

import csv
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sidecar.demo.model import CLASSES, FEATURES, predict_proba, sample_rows
from tests.prometheus_stack import (
    PROMETHEUS_DIR,
    Prometheus,
    post,
    running,
    scrape_target,
    start_model,
    start_prometheus,
    start_sidecar,
    wait_for,
    write_prometheus_config,
)

HALF = 3000  # rows in each half of the stream
BATCH = 100  # rows per request
SHIFTS = (0.5, 1.5)  # sepal_length moves by this in the first and in the second half
FLEETS = {"ab": ("a", "b"), "c": ("c",), "a": ("a",), "b": ("b",)}
ROWS = {"ab": 2 * HALF, "c": 2 * HALF, "a": HALF, "b": HALF}
SAMPLES = 21  # scrapes of every drift series before the scores are read
# |w - 1/2| < WEIGHT_SHIFT once every drift series has SAMPLES samples (module docstring).
WEIGHT_SHIFT = 1.1 / (4 * (SAMPLES - 1))
STATS = ("psi", "js", "linf", "ks")

# Real processes and over 20 s of scrapes: slow, and on a busy machine past the default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def jittered(rows: list[list[float]], rng: random.Random) -> list[list[float]]:
    """sample_rows rounds to 0.01, and a value that many rows repeat is an atom of the profile,
    where the PIT is drawn at random: replicas' PIT counts would then differ by chance. Noise
    within the rounding makes the values continuous again."""
    return [[value + rng.uniform(-0.005, 0.005) for value in row] for row in rows]


def build_profile(tmp: Path) -> Path:
    """A reference of unshifted rows and the toy model's predicted class for each, through
    `sidecar profile build`."""
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
    return profile


def sidecar_config(upstream: str, profile: Path) -> dict[str, Any]:
    return {
        "upstream": upstream,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "preset": "kserve-v1",
        "health_path": "/v2/health/ready",
        "model_name": "iris",
        "model_version": "1",
        "mapping": {"class_names": list(CLASSES), "feature_names": list(FEATURES)},
        "drift": {"profile": str(profile)},
    }


def scrape_fleets(admin: dict[str, str]) -> list[dict[str, Any]]:
    """One job; each fleet a static group whose `fleet` label the rules keep."""
    groups = [
        {"targets": [scrape_target(admin[s]) for s in members], "labels": {"fleet": fleet}}
        for fleet, members in FLEETS.items()
    ]
    return [{"job_name": "sidecar", "static_configs": groups}]


def send_rows(proxy: str, rows: list[list[float]]) -> None:
    for start in range(0, len(rows), BATCH):
        body = {"instances": rows[start : start + BATCH]}
        assert post(f"{proxy}/v1/models/iris:predict", body) == 200


def fleet_rows(prometheus: Prometheus) -> dict[str, float]:
    samples = prometheus.vector('sum by (fleet) (ml_drift_pit_count{feature="sepal_length"})')
    return {s["metric"]["fleet"]: float(s["value"][1]) for s in samples}


def feed(proxy: dict[str, str]) -> None:
    """The stream: its first half to A, its second to B, all of it to C, with no warm-up: the
    rows may come before Prometheus first scrapes a sidecar."""
    rng = random.Random(7)
    halves = [jittered(sample_rows(rng, HALF, shift), rng) for shift in SHIFTS]
    send_rows(proxy["a"], halves[0])
    send_rows(proxy["b"], halves[1])
    send_rows(proxy["c"], halves[0] + halves[1])


def wait_for_scores(prometheus: Prometheus) -> None:
    """Until the rules have evaluated with every row scraped and SAMPLES samples per series."""
    done = wait_for(lambda: fleet_rows(prometheus) == ROWS, prometheus.process, "all rows")
    assert done, prometheus.tails()
    prometheus.wait_until(
        f'min(count_over_time(ml_drift_pit_count{{feature="sepal_length"}}[1h])) >= {SAMPLES}',
        f"{SAMPLES} scrapes of every drift series",
    )
    # The KS rule is the group's last: once it has a later sample, every rule has evaluated
    # since the conditions above held.
    now = time.time()
    prometheus.wait_until(
        f"min(timestamp(model_feature:ml_drift_ks:1h)) > {now:.3f}", "a rule evaluation"
    )


@pytest.fixture(scope="module")
def fleets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("replicas")
    profile = build_profile(tmp)
    with running() as processes:
        upstream = start_model(tmp, processes)
        urls = {
            name: start_sidecar(
                tmp, sidecar_config(upstream, profile), processes, f"sidecar-{name}"
            )
            for name in ("a", "b", "c")
        }
        admin = {name: u["admin"] for name, u in urls.items()}
        config = write_prometheus_config(
            tmp, [PROMETHEUS_DIR / "rules" / "drift_rules.yml"], scrape_fleets(admin)
        )
        prometheus = start_prometheus(tmp, config, processes)
        feed({name: u["proxy"] for name, u in urls.items()})
        wait_for_scores(prometheus)
        yield prometheus


def by_fleet(
    prometheus: Prometheus, expr: str, *keys: str
) -> dict[tuple[str, ...], dict[str, float]]:
    """{values of `keys`: {fleet: value}} of one instant query, so of one rule evaluation."""
    found: dict[tuple[str, ...], dict[str, float]] = {}
    for sample in prometheus.vector(expr):
        labels = sample["metric"]
        where = tuple(labels[key] for key in keys)
        found.setdefault(where, {})[labels["fleet"]] = float(sample["value"][1])
    return found


@pytest.mark.parametrize(
    ("metric", "key", "features"),
    [
        ("ml_drift_bin_total", "bin", {*FEATURES, "__class__"}),
        ("ml_drift_pit_bucket", "le", set(FEATURES)),  # the PIT is for numbers only
    ],
)
def test_replicas_count_what_one_sidecar_counts(
    fleets: Prometheus, metric: str, key: str, features: set[str]
) -> None:
    """A's and B's counters add up to C's, to the unit, in every bin or PIT bucket of every
    feature."""
    counts = by_fleet(fleets, f"sum by (fleet, feature, {key}) ({metric})", "feature", key)
    assert {feature for feature, _ in counts} == features
    assert {where: c["ab"] for where, c in counts.items()} == {
        where: c["c"] for where, c in counts.items()
    }


def test_every_fleet_reads_the_same_reference(fleets: Prometheus) -> None:
    """The profile's shares, recorded per fleet, are the same numbers in every fleet."""
    shares = by_fleet(fleets, "model_feature_bin:ml_drift_reference_fraction:max", "feature", "bin")
    assert {where: set(s) for where, s in shares.items()} == {
        where: set(FLEETS) for where in shares
    }
    assert all(len(set(s.values())) == 1 for s in shares.values())


@pytest.mark.parametrize("stat", STATS)
def test_two_replicas_score_what_one_sidecar_scores(fleets: Prometheus, stat: str) -> None:
    """Fleet "ab" scores every feature as fleet "c" does, within the extrapolation bound."""
    scores = by_fleet(fleets, f"model_feature:ml_drift_{stat}:1h", "feature")
    assert set(scores) >= {(feature,) for feature in FEATURES}
    off = {}
    for feature, s in scores.items():
        spread = max(abs(s["a"] - s["c"]), abs(s["b"] - s["c"]))
        # 1e-12: the sums Prometheus adds in another order, for a spread of 0
        if abs(s["ab"] - s["c"]) > 2 * WEIGHT_SHIFT * spread + 1e-12:
            off[feature] = s
    assert off == {}


def test_the_stream_drifts_and_its_halves_score_far_apart(fleets: Prometheus) -> None:
    """sepal_length drifts clearly, more in B's half than in A's, so far apart that averaging the
    replicas' PSI would miss the whole stream's by more than the tolerance."""
    s = by_fleet(fleets, 'model_feature:ml_drift_psi:1h{feature="sepal_length"}', "feature")[
        ("sepal_length",)
    ]
    assert 0.25 < s["a"] < s["c"] < s["b"]
    spread = max(s["b"] - s["c"], s["c"] - s["a"])
    assert (s["a"] + s["b"]) / 2 - s["c"] > 2 * WEIGHT_SHIFT * spread
