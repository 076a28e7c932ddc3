"""Prometheus rules and the Alertmanager config, checked and unit-tested by the real tools.

promtool and amtool come from Debian's `prometheus` and `prometheus-alertmanager` packages
(scripts/test installs them). These tests fail rather than skip when a tool is missing: CI
installs both, so a missing tool means a broken setup, not a reason to pass.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted(
    path
    for path in PROMETHEUS.rglob("*.yml")
    if path.name != "prometheus.yml" and "tests" not in path.relative_to(PROMETHEUS).parts
)
UNIT_TEST_FILES = sorted((PROMETHEUS / "tests").glob("*_test.yml"))
ALERTS = PROMETHEUS / "rules" / "alerts.yml"

# Grafana's variables, replaced by what they expand to when every model is selected.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
}

# Who hears about an alert, by (severity, category): only serving problems page.
EXPECTED_RECEIVERS = {
    ("critical", "availability"): "pager-placeholder,ml-team-placeholder",
    ("critical", "latency"): "pager-placeholder,ml-team-placeholder",
    ("critical", "drift"): "ml-team-placeholder",
    ("warning", "availability"): "ml-team-placeholder",
    ("warning", "latency"): "ml-team-placeholder",
    ("warning", "traffic"): "ml-team-placeholder",
    ("warning", "model-quality"): "ml-team-placeholder",
    ("warning", "drift"): "ml-team-placeholder",
    ("warning", "sidecar"): "ml-team-placeholder",
    ("info", "model-quality"): "tickets-placeholder",
    ("info", "sidecar"): "tickets-placeholder",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: apt-get install -y prometheus prometheus-alertmanager "
            "(scripts/test does it when run as root)"
        )
    return path


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            exprs.extend(target["expr"] for target in panel.get("targets", []))
    return exprs


def load_generator() -> ModuleType:
    path = ROOT / "scripts" / "generate_prometheusrule.py"
    spec = importlib.util.spec_from_file_location("generate_prometheusrule", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: str(p.relative_to(PROMETHEUS)))
def test_rule_file_passes_promtool_check(rule_file: Path) -> None:
    """Every rule file parses, and every expression in it is valid PromQL."""
    result = run(tool("promtool"), "check", "rules", rule_file)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("unit_tests", UNIT_TEST_FILES, ids=lambda p: p.name)
def test_rule_unit_tests_pass(unit_tests: Path) -> None:
    """promtool's unit tests for the recording rules and alerts pass."""
    result = run(tool("promtool"), "test", "rules", unit_tests.name, cwd=unit_tests.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_passes_promtool_check() -> None:
    """The compose demo's prometheus.yml is valid and every rule file it names exists."""
    result = run(tool("promtool"), "check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """Each alert (at each severity) fires in some unit test, and each stays quiet in another."""
    fired: set[tuple[str, str]] = set()
    quiet: set[str] = set()
    for path in UNIT_TEST_FILES:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                expected = check.get("exp_alerts") or []
                if not expected:
                    quiet.add(check["alertname"])
                for alert in expected:
                    fired.add((check["alertname"], alert["exp_labels"]["severity"]))
    rules = alert_rules()
    assert {(r["alert"], r["labels"]["severity"]) for r in rules} - fired == set()
    assert {r["alert"] for r in rules} - quiet == set()


def test_generated_prometheusrule_passes_promtool_check(tmp_path: Path) -> None:
    """The PrometheusRule's groups load as one rule file: group names are unique across files."""
    manifest = yaml.safe_load(load_generator().render())
    rules = tmp_path / "prometheusrule_spec.yml"
    rules.write_text(yaml.safe_dump(manifest["spec"]), encoding="utf-8")
    result = run(tool("promtool"), "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """Every dashboard panel's query, with Grafana's variables filled in, is valid PromQL."""
    rules = []
    for index, expr in enumerate(dashboard_exprs()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)  # template variables sit in regex matchers
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    assert rules
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}), encoding="utf-8")
    result = run(tool("promtool"), "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_config_passes_amtool_check() -> None:
    """alertmanager.yml is valid: routes, inhibitions and receivers all resolve."""
    result = run(tool("amtool"), "check-config", ALERTMANAGER_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "rule", alert_rules(), ids=lambda r: f"{r['alert']}-{r['labels']['severity']}"
)
def test_alert_routes_to_the_receiver_its_severity_calls_for(rule: dict[str, Any]) -> None:
    """amtool routes each alert, by its severity and category, to the expected receivers."""
    labels = rule["labels"]
    expected = EXPECTED_RECEIVERS[(labels["severity"], labels["category"])]
    result = run(
        tool("amtool"),
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER_CONFIG}",
        f"--verify.receivers={expected}",
        f"alertname={rule['alert']}",
        f"severity={labels['severity']}",
        f"category={labels['category']}",
        "model_name=iris",
    )
    assert result.returncode == 0, result.stdout + result.stderr
