"""Drift through the real proxy: a profile built by the CLI, traffic shifted on one feature."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from sidecar.cli import main
from sidecar.demo.model import FEATURES, sample_rows
from sidecar.demo.run import send_traffic
from sidecar.drift.profile import content_hash, load
from sidecar.drift.settings import DriftSettings
from sidecar.extract.spec import MappingSpec
from tests.conftest import StartSidecar, sample, scrape


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
    assert sample(text, "ml_drift_bin_total", bin="b00", **labels) == 0  # exists before traffic
    assert sample(text, "ml_model_info", reference_profile=content_hash(load(profile_path))) == 1

    await send_traffic(sidecar.proxy_url, 150, batch=8, seed=2, shift=1.0)
    text = await scrape(sidecar)
    assert sample(text, "ml_drift_window_count", **labels) == 1200
    assert (sample(text, "ml_drift_status", **labels) or 0) >= 1
    for steady in ("sepal_width", "petal_length", "petal_width"):
        assert sample(text, "ml_drift_status", model_name="iris", feature=steady) == 0
    assert (sample(text, "ml_drift_score", stat="psi", **labels) or 0) > 0.25
