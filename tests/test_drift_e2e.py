"""Drift through the real proxy: a profile built by the CLI, traffic shifted on one feature."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sidecar.cli import main
from sidecar.demo.model import FEATURES, sample_rows
from sidecar.demo.run import send_traffic
from sidecar.drift.profile import content_hash, load
from sidecar.drift.settings import DriftSettings
from sidecar.extract.spec import MappingSpec
from tests.conftest import StartSidecar, assert_sample, sample, scrape


def write_reference(path: Path, rows: int) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FEATURES)
        writer.writerows(sample_rows(random.Random(1), rows))


async def test_shifted_feature_is_flagged_and_others_are_not(
    tmp_path: Path,
    toy_model: str,
    start_sidecar: StartSidecar,
) -> None:
    """Traffic with sepal_length moved by +1.0: that feature drifts, the unmoved ones do not."""
    reference = tmp_path / "reference.csv"
    write_reference(reference, 20_000)
    profile_path = tmp_path / "profile.json"
    assert main(["profile", "build", str(reference), "-o", str(profile_path)]) == 0
    sidecar = await start_sidecar(
        toy_model,
        preset="kserve-v1",
        model_name="iris",
        mapping=MappingSpec(feature_names=FEATURES),
        drift=DriftSettings(profile=str(profile_path), min_window=500),
    )
    text = await scrape(sidecar)
    labels = {"model_name": "iris", "feature": "sepal_length"}
    assert_sample(text, "ml_drift_bin_total", 0, bin="b00", **labels)  # exists before traffic
    assert sample(text, "ml_model_info", reference_profile=content_hash(load(profile_path))) == 1

    await send_traffic(sidecar.proxy_url, 150, batch=8, seed=2, shift=1.0)
    text = await scrape(sidecar)
    assert_sample(text, "ml_drift_window_rows", 1200, **labels)
    assert (sample(text, "ml_drift_status", **labels) or 0) >= 1
    for steady in ("sepal_width", "petal_length", "petal_width"):
        assert_sample(text, "ml_drift_status", 0, model_name="iris", feature=steady)
    assert (sample(text, "ml_drift_score", stat="psi", **labels) or 0) > 0.25
    for stat in ("ks", "js", "wasserstein"):  # what the drift dashboard plots beside PSI
        assert (sample(text, "ml_drift_score", stat=stat, **labels) or 0) > 0, stat
    # The size status grades, in reference standard deviations: a +1.0 move of a feature whose
    # sd is about 0.8 (the toy iris mixture's sepal_length) reads above critical_shift.
    assert (sample(text, "ml_drift_score", stat="shift", **labels) or 0) > 0.5
    # The fleet-wide KS rules (deploy/prometheus/rules/drift_rules.yml) read these buckets by name.
    assert pit_bounds(text, **labels) == [*PIT_RULE_BOUNDS, "1.0", "+Inf"]


PIT_RULE_BOUNDS = [
    "0.05", "0.1", "0.15", "0.2", "0.25", "0.3", "0.35", "0.4", "0.45", "0.5",
    "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9", "0.95",
]  # fmt: skip


def pit_bounds(text: str, **labels: str) -> list[str]:
    """The `le` of every ml_drift_pit_bucket sample with these labels, in exposition order."""
    return [
        metric.labels["le"]
        for family in text_string_to_metric_families(text)
        for metric in family.samples
        if metric.name == "ml_drift_pit_bucket"
        and all(metric.labels.get(k) == v for k, v in labels.items())
    ]
