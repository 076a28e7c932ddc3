"""What a live sidecar serves on /metrics passes `promtool check metrics`, Prometheus's name lint.

promtool flags names that mislead whoever queries them: a gauge ending in `_count` reads as half of
a histogram, a counter without `_total`, a unit that is not a base unit. The scrape comes from a
real sidecar in front of the toy model with a drift profile, after traffic, so every family it can
serve in one process is in it, labelled series included. No finding is accepted.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from sidecar.cli import main
from sidecar.demo.model import FEATURES
from sidecar.demo.run import send_traffic
from sidecar.drift.settings import DriftSettings
from sidecar.extract.spec import MappingSpec
from tests.conftest import StartSidecar, sample, scrape_until
from tests.test_drift_e2e import write_reference
from tests.test_promtool import tool


def promtool_check_metrics(exposition: str) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` reads the exposition on stdin; it exits non-zero on any finding."""
    return subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        check=False,
    )


async def test_a_live_scrape_with_drift_passes_promtool_check_metrics(
    tmp_path: Path, toy_model: str, start_sidecar: StartSidecar
) -> None:
    reference, profile = tmp_path / "reference.csv", tmp_path / "profile.json"
    write_reference(reference, 2_000)
    assert main(["profile", "build", str(reference), "-o", str(profile)]) == 0
    sidecar = await start_sidecar(
        toy_model,
        preset="kserve-v1",
        model_name="iris",
        mapping=MappingSpec(feature_names=FEATURES),
        drift=DriftSettings(profile=str(profile)),
    )
    await send_traffic(sidecar.proxy_url, 20, batch=4, seed=1)
    rows = {"model_name": "iris", "feature": "petal_length"}
    text = await scrape_until(
        sidecar, lambda text: sample(text, "ml_drift_window_rows", **rows) == 80
    )
    assert sample(text, "ml_drift_window_rows", **rows) == 80  # the drift families are in it

    result = promtool_check_metrics(text)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_promtool_check_metrics_flags_a_gauge_named_like_a_histograms_count() -> None:
    """The check above can fail: the name this sidecar used to give its drift window is flagged."""
    exposition = "# HELP ml_drift_window_count Rows.\n# TYPE ml_drift_window_count gauge\n"
    exposition += 'ml_drift_window_count{feature="x"} 1\n'
    result = promtool_check_metrics(exposition)
    assert result.returncode != 0
    assert "ml_drift_window_count" in result.stdout + result.stderr
