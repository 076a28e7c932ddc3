"""The fleet-wide drift recording rules: valid, unit-tested by promtool, and the same arithmetic as
the sidecar's in-process scores."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from sidecar.drift import sketches as sk

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "drift_rules.yml"
UNIT_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "drift_rules_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "drift.json"


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: apt-get install -y prometheus")
    return subprocess.run(
        [path, *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_drift_rules_pass_promtool_check():
    """Every drift recording rule parses as valid PromQL."""
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_drift_rules_compute_the_hand_worked_example():
    """promtool's unit test: PSI, JS, L-inf and KS of two merged replicas equal the textbook values,
    over both the 1h and the 1d window."""
    result = promtool("test", "rules", UNIT_TESTS.name, cwd=UNIT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_test_expectations_are_the_sidecars_own_arithmetic():
    """The numbers the promtool test expects are what sidecar.drift.sketches computes in process."""
    expected = {
        match.group(1): float(match.group(2))
        for match in re.finditer(
            r"model_feature:ml_drift_(\w+):1h - ([\d.]+)\)", UNIT_TESTS.read_text()
        )
    }
    p, q = np.array([0.1, 0.2, 0.3, 0.4]), np.full(4, 0.25)
    cumulative = 4 * np.arange(1, 21) ** 2  # merged PIT buckets of the example: (k/20)^2 of 1600
    cells = np.diff(np.concatenate(([0], cumulative))).astype(np.int64)
    assert expected["psi"] == pytest.approx(sk.psi(p, q), abs=1e-15)
    assert expected["js"] == pytest.approx(sk.js(p, q), abs=1e-15)
    assert expected["linf"] == pytest.approx(sk.linf(p, q), abs=1e-15)
    assert expected["ks"] == pytest.approx(sk.ks_from_pit(cells, 0, 0), abs=1e-15)


def test_every_drift_record_the_dashboard_reads_is_recorded():
    """The drift dashboard's model_feature:* series all come from drift_rules.yml."""
    recorded = {
        rule["record"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }
    wanted = set(re.findall(r"model_feature[\w]*:ml_drift_\w+:\w+", DASHBOARD.read_text()))
    assert wanted, "the dashboard reads no recorded drift series"
    assert wanted <= recorded
    assert {
        f"model_feature:ml_drift_{s}:{w}" for s in ("psi", "js", "linf", "ks") for w in ("1h", "1d")
    } <= recorded
