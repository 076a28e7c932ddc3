"""The deployment files agree with each other and with the sidecar, read without running anything.

No Docker engine or cluster is needed: compose, the Dockerfile, the Kubernetes manifests, the
rules and the dashboards are parsed and cross-checked. tests/test_kubernetes_kit.py renders the
kustomize overlays with kubectl.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from sidecar.cli import build_parser
from sidecar.config import Config, load

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
KUBERNETES = DEPLOY / "kubernetes"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
OVERLAYS = sorted(p.parent for p in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))
GENERATOR = ROOT / "scripts" / "generate_prometheusrule.py"

PROXY_PORT, ADMIN_PORT, MODEL_PORT = 8080, 9101, 9000

# The metric catalogue (docs/metrics.md): every series the sidecar exports, by type.
HISTOGRAMS = {
    "ml_request_duration_seconds",
    "ml_upstream_duration_seconds",
    "ml_request_size_bytes",
    "ml_response_size_bytes",
    "ml_batch_size",
    "sidecar_overhead_seconds",
    "ml_prediction_confidence",
    "ml_prediction_value",
    "ml_drift_pit",
}
COUNTERS = {
    "ml_requests_total",
    "ml_errors_total",
    "sidecar_dropped_observations_total",
    "sidecar_label_overflow_total",
    "sidecar_worker_restarts_total",
    "process_cpu_seconds_total",
    "ml_predictions_total",
    "ml_low_confidence_predictions_total",
    "ml_feature_missing_total",
    "ml_feature_invalid_total",
    "ml_drift_bin_total",
    "ml_feedback_total",
    "ml_labelled_total",
    "ml_labelled_replaced_total",
    "ml_regression_labelled_total",
    "ml_regression_replaced_total",
    "ml_expected_correct_total",
    "ml_expected_correct_rows_total",
}
GAUGES = {
    "ml_requests_in_progress",
    "ml_model_info",
    "sidecar_upstream_up",
    "process_resident_memory_bytes",
    "ml_drift_reference_fraction",
    "ml_drift_score",
    "ml_drift_window_rows",
    "ml_drift_status",
    "ml_dataset_drift_share",
    "ml_drift_reference_frozen",
    "ml_accuracy",
    "ml_precision",
    "ml_recall",
    "ml_f1",
    "ml_macro_f1",
    "ml_mae",
    "ml_rmse",
    "ml_labelled_rows",
}
# Series Prometheus itself writes for every target.
SCRAPE_SERIES = {"up", "scrape_samples_scraped", "scrape_duration_seconds"}
EXPORTED = (
    COUNTERS
    | GAUGES
    | {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords).

    >>> sorted(metric_names('sum by (le) (rate(a_bucket{x="y"}[5m])) / ignoring (le) b:c:d'))
    ['a_bucket', 'b:c:d']
    """
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", _STRING.sub(" ", expr))))
    names = set()
    for match in _IDENTIFIER.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":  # 1e3, 5m, 0.5
            continue
        if text[match.end() :].lstrip().startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def read_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def rule_files() -> list[Path]:
    return sorted(
        p
        for p in PROMETHEUS.rglob("*.yml")
        if p.name != "prometheus.yml" and "tests" not in p.relative_to(PROMETHEUS).parts
    )


def all_rules() -> Iterator[dict[str, Any]]:
    for path in rule_files():
        for group in read_yaml(path)["groups"]:
            yield from group["rules"]


def own_rules() -> Iterator[dict[str, Any]]:
    """The rules of this part of the project (other rule files answer for their own names)."""
    for name in ("recording.yml", "alerts.yml"):
        for group in read_yaml(PROMETHEUS / "rules" / name)["groups"]:
            yield from group["rules"]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in all_rules() if "record" in rule}


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in own_rules() if "alert" in rule]


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in DASHBOARDS}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def compose() -> dict[str, Any]:
    data: dict[str, Any] = read_yaml(ROOT / "docker-compose.yml")
    return data


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(
        r"\\\n\s*",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in joined.splitlines()
        if line.strip()
    ]


def kubernetes_docs(directory: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(read_yaml_all(path))
    return docs


def load_generator() -> ModuleType:
    path = GENERATOR
    spec = importlib.util.spec_from_file_location("generate_prometheusrule", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sidecar_flags() -> list[str]:
    command = compose()["services"]["sidecar"]["command"]
    assert isinstance(command, list)
    return [str(arg) for arg in command]


def flag(args: list[str], name: str) -> str:
    for index, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[index + 1]
    raise AssertionError(f"{name} not in {args}")


# --- metric names --------------------------------------------------------------------------------


def test_metric_name_extraction_skips_functions_labels_and_durations() -> None:
    """The PromQL scanner the checks below rely on finds metric names and nothing else."""
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(x_bucket{job="a"}[$__rate_interval])))'
        " / on () group_left () max(y offset 1d) > 1e3 and z"
    )
    assert metric_names(expr) == {"x_bucket", "y", "z"}


def test_rules_use_only_catalogue_metrics_and_recorded_series() -> None:
    """Every recording rule and alert reads series the sidecar exports, Prometheus writes, or
    another rule records."""
    known = EXPORTED | SCRAPE_SERIES | recorded_names()
    unknown = {
        name: rule.get("record", rule.get("alert"))
        for rule in own_rules()
        for name in metric_names(rule["expr"])
        if name not in known
    }
    assert unknown == {}


def test_dashboards_use_only_catalogue_metrics_and_recorded_series() -> None:
    """Every panel query and variable reads exported, scrape or recorded series only."""
    known = EXPORTED | SCRAPE_SERIES | recorded_names()
    unknown = {}
    for name, dashboard in dashboards().items():
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                for metric in metric_names(target["expr"]) - known:
                    unknown[metric] = f"{name}: {panel['title']}"
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["query"]["query"]
                inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
                assert inner, query
                for metric in metric_names(inner.group(1)) - known:
                    unknown[metric] = f"{name}: variable {variable['name']}"
    assert unknown == {}


def test_metrics_doc_describes_every_metric_and_recorded_series() -> None:
    """docs/metrics.md has a row for every exported metric and recording rule of
    recording.yml (drift and feedback rules are documented with drift and feedback)."""
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    recorded = {rule["record"] for rule in own_rules() if "record" in rule}
    names = COUNTERS | GAUGES | HISTOGRAMS | recorded
    assert {name for name in names if f"`{name}" not in text} == set()


# --- alerts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule", alert_rules(), ids=lambda r: f"{r['alert']}-{r['labels']['severity']}"
)
def test_alert_carries_severity_for_and_a_numbered_runbook(rule: dict[str, Any]) -> None:
    """Each alert has a severity, a category, a `for`, a summary, a description and a runbook
    whose lines are steps 1, 2, 3 ... and a dashboard link to a dashboard that exists."""
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert rule["labels"]["category"] in {
        "availability",
        "latency",
        "traffic",
        "model-quality",
        "drift",
        "sidecar",
    }
    assert re.fullmatch(r"\d+[smh]", rule["for"])
    annotations = rule["annotations"]
    assert annotations["summary"]
    assert annotations["description"]
    steps = annotations["runbook"].strip().splitlines()
    assert len(steps) >= 3
    assert [int(step.split(".", 1)[0]) for step in steps] == list(range(1, len(steps) + 1))
    uids = {dashboard["uid"] for dashboard in dashboards().values()}
    assert annotations["dashboard"].removeprefix("/d/") in uids


def test_slo_objectives_are_set_once() -> None:
    """Each objective is recorded once, the latency threshold is a bucket of the duration
    histogram, the SLO rules hold no other number than 0 and 1 (they read the objectives), and
    the accuracy alert compares with its objective rather than a number of its own."""
    objectives = [r for r in own_rules() if r.get("record") == "sidecar:slo_objective:ratio"]
    assert sorted(r["labels"]["slo"] for r in objectives) == ["accuracy", "availability", "latency"]
    accuracy = next(r for r in alert_rules() if r["alert"] == "MLAccuracyBelowObjective")
    assert re.search(
        r'model:ml_accuracy:ratio1h\s*<[^<>]*sidecar:slo_objective:ratio\{slo="accuracy"\}',
        accuracy["expr"],
    )
    latency = next(r for r in objectives if r["labels"]["slo"] == "latency")
    from sidecar.buckets import DEFAULT_BUCKETS

    assert float(latency["labels"]["le"]) in DEFAULT_BUCKETS["ml_request_duration_seconds"]
    slo_rules = [
        r
        for r in own_rules()
        if re.search(r"slo_|errors:ratio|slow_ratio", r.get("record", "")) and r not in objectives
    ]
    assert len(slo_rules) == 28  # 7 windows x (errors, slow requests, and their burn rates)
    for rule in slo_rules:
        numbers = re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", _RANGE.sub("", rule["expr"]))
        assert set(numbers) <= {"0", "1"}, rule["record"]


def test_alertmanager_inhibits_warnings_while_the_critical_twin_fires() -> None:
    """Critical mutes warning for the same alert name and model; receivers say they are
    placeholders."""
    config = read_yaml(DEPLOY / "alertmanager" / "alertmanager.yml")
    rule = next(
        r for r in config["inhibit_rules"] if r["source_matchers"] == ['severity = "critical"']
    )
    assert {"alertname", "model_name", "model_version"} <= set(rule["equal"])
    assert any("warning" in matcher for matcher in rule["target_matchers"])
    assert all("placeholder" in receiver["name"] for receiver in config["receivers"])
    assert {"alertname", "model_name"} <= set(config["route"]["group_by"])


# --- compose, Dockerfile, Prometheus and Grafana wiring -------------------------------------------


def test_config_defaults_match_the_documented_ports() -> None:
    """The sidecar's own defaults are the ports every deployment file assumes."""
    config = Config(upstream=f"http://127.0.0.1:{MODEL_PORT}")
    assert (config.port, config.metrics_port) == (PROXY_PORT, ADMIN_PORT)


def test_compose_mounts_only_paths_that_exist() -> None:
    """Every bind mount of docker-compose.yml points at a file or directory of this repo."""
    sources = [
        volume.split(":", 1)[0]
        for service in compose()["services"].values()
        for volume in service.get("volumes", [])
        if volume.startswith(".")
    ]
    assert sources
    assert [s for s in sources if not (ROOT / s).exists()] == []


def test_compose_wires_model_sidecar_and_prometheus_on_the_same_ports() -> None:
    """Compose's model port is the sidecar's upstream, its published ports are the sidecar's
    defaults, and prometheus.yml scrapes the sidecar service on the admin port."""
    services = compose()["services"]
    model_args = [str(a) for a in services["model"]["command"]]
    assert model_args[model_args.index("--port") + 1] == str(MODEL_PORT)
    upstream = urlsplit(flag(sidecar_flags(), "--upstream"))
    assert (upstream.hostname, upstream.port) == ("model", MODEL_PORT)
    assert services["sidecar"]["ports"] == [
        f"{PROXY_PORT}:{PROXY_PORT}",
        f"{ADMIN_PORT}:{ADMIN_PORT}",
    ]

    scrape = read_yaml(PROMETHEUS / "prometheus.yml")
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "sidecar")
    assert job["static_configs"][0]["targets"] == [f"sidecar:{ADMIN_PORT}"]
    alertmanager = scrape["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0]
    assert alertmanager.split(":")[0] in services
    loaded = {path for pattern in scrape["rule_files"] for path in PROMETHEUS.glob(pattern)}
    assert loaded == set(rule_files())


def test_compose_sidecar_flags_are_ones_the_sidecar_accepts() -> None:
    """`sidecar serve` parses the compose service's flags, and with the config file they mount
    they make a valid config that listens on the default ports."""
    args = build_parser().parse_args(["serve", *sidecar_flags()])
    keys = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "config", "handler") and v is not None
    }
    config_file = None
    if args.config:
        for volume in compose()["services"]["sidecar"]["volumes"]:
            source, target = volume.split(":")[:2]
            if args.config.startswith(target + "/"):
                config_file = ROOT / source / args.config.removeprefix(target + "/")
        assert config_file is not None, f"{args.config} is not mounted into the sidecar"
    config = load(config_file, environ={}, overrides=keys)
    assert config.upstream == f"http://model:{MODEL_PORT}"
    assert (config.port, config.metrics_port) == (PROXY_PORT, ADMIN_PORT)


def test_compose_traffic_generator_calls_the_demo_as_it_is() -> None:
    """The traffic service's inline script compiles and calls send_traffic with arguments it has."""
    import inspect

    from sidecar.demo.run import send_traffic

    script = compose()["services"]["traffic"]["command"][0]
    compile(script, "traffic", "exec")
    assert {"seed", "shift"} <= set(inspect.signature(send_traffic).parameters)
    assert "http://sidecar:8080" in script


def test_compose_mounts_prometheus_alertmanager_and_grafana_config_where_they_read_it() -> None:
    """Prometheus's --config.file, Alertmanager's and Grafana's provisioning paths are mounted."""
    services = compose()["services"]

    def mounted(service: str, target: str) -> Path:
        volume: str
        for volume in services[service]["volumes"]:
            source, _, rest = volume.partition(":")
            mount = rest.split(":")[0]
            if target == mount or target.startswith(mount + "/"):
                return ROOT / source / target.removeprefix(mount).lstrip("/")
        raise AssertionError(f"{target} is not mounted into {service}")

    assert mounted("prometheus", flag(services["prometheus"]["command"], "--config.file")).is_file()
    assert mounted(
        "alertmanager", flag(services["alertmanager"]["command"], "--config.file")
    ).is_file()
    assert mounted("grafana", "/etc/grafana/provisioning/datasources").is_dir()
    provider = read_yaml(GRAFANA / "provisioning" / "dashboards" / "sidecar.yml")["providers"][0]
    assert sorted(mounted("grafana", provider["options"]["path"]).glob("*.json")) == DASHBOARDS
    datasource = read_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    url = urlsplit(datasource["datasources"][0]["url"])
    assert url.hostname in services
    assert url.port == 9090
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounted("grafana", home).is_file()


def test_dockerfile_builds_a_slim_non_root_image_that_serves_and_checks_healthz() -> None:
    """Slim Python base, non-root USER, the two ports, the health check on the admin port's
    /healthz, and `sidecar serve` as the entrypoint. Built in stages: the first installs
    requirements.lock, then the sidecar, compiled, without its dependencies; the image copies
    only that virtualenv, and nothing installs the profile extra (pyarrow)."""
    steps = dockerfile()
    froms = [i for i, (instruction, _) in enumerate(steps) if instruction == "FROM"]
    assert len(froms) > 1
    build, final = steps[froms[0] : froms[-1]], steps[froms[-1] :]
    stage = build[0][1].split()
    assert re.fullmatch(r"python:3\.1[1-9]-slim\S*", stage[0])
    assert stage[1:2] == ["AS"]
    values = {instruction: args for instruction, args in final}
    assert re.fullmatch(r"python:3\.1[1-9]-slim\S*", values["FROM"])
    runs = [args for instruction, args in build if instruction == "RUN"]
    assert any(i == "COPY" and a.split()[0] == "requirements.lock" for i, a in build), (
        "the lock is copied into the build stage"
    )
    assert any(re.search(r"pip install .*-r \S*requirements\.lock", run) for run in runs)
    assert any(  # the compiled build (setup.py), as a wheel, then the wheel alone
        re.search(
            r"SIDECAR_MYPYC=1 \S+pip wheel --no-build-isolation --no-deps -w (\S+) \.\s+"
            r"&&\s+\S+pip install --no-deps \1/sidecar-\*\.whl$",
            run,
        )
        for run in runs
    )
    assert [i for i, _ in final].count("RUN") <= 1
    assert "pip" not in values.get("RUN", "")
    assert any(i == "COPY" and a.startswith(f"--from={stage[2]} ") for i, a in final)
    assert not [a for _, a in steps if re.search(r"\[profile\]|pyarrow", a)]
    assert values["USER"].split(":")[0] not in {"root", "0"}
    assert set(values["EXPOSE"].split()) == {str(PROXY_PORT), str(ADMIN_PORT)}
    assert f"http://127.0.0.1:{ADMIN_PORT}/healthz" in values["HEALTHCHECK"]
    assert json.loads(values["ENTRYPOINT"]) == ["sidecar", "serve"]
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8")
    for instruction, args in steps:
        if instruction == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists()
                assert f"!{source.rstrip('/')}" in ignored


def test_requirements_lock_pins_what_sidecar_serve_needs_and_no_profile_extra() -> None:
    """requirements.lock pins (==) every runtime dependency of pyproject.toml but those of the
    `profile` extra, and none of those: the image serves without them."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    profile = {canonicalize_name(Requirement(r).name) for r in extras["profile"]}
    runtime = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]} - profile
    pins = {}
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            assert str(requirement.specifier).startswith("=="), line
            pins[canonicalize_name(requirement.name)] = requirement
    assert profile == {"pyarrow"}
    assert runtime <= set(pins)
    assert not profile & set(pins)
    assert "sidecar" not in pins


# --- dashboards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [p.name for p in DASHBOARDS])
def test_dashboard_is_templated_by_model_and_every_panel_has_a_query(name: str) -> None:
    """Each dashboard has model_name and model_version variables, unique panel ids, and every
    panel's query in targets[].expr using only variables it defines."""
    dashboard = dashboards()[name]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model_name", "model_version"} <= variables
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
            assert used - variables - {"__rate_interval", "__interval", "__range"} == set()


def test_dashboards_cover_health_quality_drift_and_the_sidecar() -> None:
    """Four dashboards with distinct uids, the ones alerts link to."""
    uids = sorted(d["uid"] for d in dashboards().values())
    assert uids == ["sidecar-drift", "sidecar-health", "sidecar-model-quality", "sidecar-self"]


# --- Kubernetes ----------------------------------------------------------------------------------


def test_prometheusrule_is_what_the_generator_writes() -> None:
    """base/prometheusrule.yaml is exactly the generator's output from today's rule files."""
    expected = load_generator().render()
    assert (KUBERNETES / "base" / "prometheusrule.yaml").read_text(encoding="utf-8") == expected


def test_generator_check_runs_from_any_directory(tmp_path: Path) -> None:
    """`scripts/generate_prometheusrule.py --check`, run as a script from elsewhere, finds the rule
    files and the manifest by its own location and reports the manifest up to date."""
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_prometheusrule_holds_every_rule_group() -> None:
    """The generated manifest carries every group of every rule file, unchanged."""
    manifest = read_yaml(KUBERNETES / "base" / "prometheusrule.yaml")
    groups = [g for path in rule_files() for g in read_yaml(path)["groups"]]
    assert sorted(g["name"] for g in manifest["spec"]["groups"]) == sorted(
        g["name"] for g in groups
    )


@pytest.mark.parametrize("directory", [KUBERNETES / "base", *OVERLAYS], ids=lambda p: p.name)
def test_kustomization_lists_only_files_that_exist(directory: Path) -> None:
    """Every resource and patch a kustomization names is there."""
    kustomization = read_yaml(directory / "kustomization.yaml")
    for resource in kustomization.get("resources", []):
        assert (directory / resource).exists(), resource
    for patch in kustomization.get("patches", []):
        assert "path" not in patch or (directory / patch["path"]).is_file(), patch
    for component in kustomization.get("components", []):
        assert (directory / component / "kustomization.yaml").is_file(), component


def base_deployment() -> dict[str, Any]:
    docs = kubernetes_docs(KUBERNETES / "base")
    return next(d for d in docs if d["kind"] == "Deployment")


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod's containers by name, the init containers (the sidecar) included."""
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def test_sidecar_container_probes_the_admin_port_and_has_no_cpu_limit() -> None:
    """Liveness on /healthz and readiness on /readyz of the admin port; requests set; no CPU limit
    (CFS throttling of a proxy is latency on every request)."""
    sidecar = containers(base_deployment())["sidecar"]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"http": PROXY_PORT, "admin": ADMIN_PORT}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert {"cpu", "memory"} <= set(sidecar["resources"]["requests"])
    assert "cpu" not in sidecar["resources"]["limits"]
    assert sidecar["args"] == ["--config", "/etc/sidecar/sidecar.yaml"]


def test_service_and_servicemonitor_scrape_the_admin_port_as_job_sidecar() -> None:
    """Clients' Service offers the proxy port only; the metrics Service the admin port, which the
    ServiceMonitor scrapes, taking job="sidecar" from that Service's label."""
    docs = kubernetes_docs(KUBERNETES / "base")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    ports = {
        name: {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
        for name, service in services.items()
    }
    assert ports == {
        "model": {"http": (PROXY_PORT, PROXY_PORT)},
        "model-metrics": {"metrics": (ADMIN_PORT, ADMIN_PORT)},
    }
    metrics = services["model-metrics"]
    assert metrics["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "sidecar"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert [
        n for n, s in services.items() if selector.items() <= s["metadata"]["labels"].items()
    ] == ["model-metrics"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    template_labels = base_deployment()["spec"]["template"]["metadata"]["labels"]
    for service in services.values():
        assert service["spec"]["selector"].items() <= template_labels.items()


def sidecar_configs() -> dict[str, str]:
    """The sidecar.yaml of the base and of each overlay's ConfigMap (patch), `sidecar-config` or
    `<model>-sidecar-config`."""
    found = {}
    for directory in [KUBERNETES / "base", *OVERLAYS]:
        for doc in kubernetes_docs(directory):
            if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("sidecar-config"):
                found[directory.name] = doc["data"]["sidecar.yaml"]
    return found


def test_every_overlay_replaces_the_sidecar_config() -> None:
    """Base and each overlay carry their own sidecar.yaml."""
    assert set(sidecar_configs()) == {"base", *(o.name for o in OVERLAYS)}


@pytest.mark.parametrize("name", ["base", *(o.name for o in OVERLAYS)])
def test_sidecar_config_is_valid_and_points_at_the_model_port(name: str, tmp_path: Path) -> None:
    """Each sidecar.yaml loads as a sidecar Config, and its upstream port is the port the model
    container of that directory listens on (in its command, args, env or config files)."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(sidecar_configs()[name], encoding="utf-8")
    config = load(path, environ={})
    upstream = urlsplit(config.upstream)
    assert (upstream.hostname, upstream.port) == ("127.0.0.1", MODEL_PORT)
    assert config.health_path
    directory = KUBERNETES / "base" if name == "base" else KUBERNETES / "overlays" / name
    model_side = json.dumps(
        [
            d
            for d in kubernetes_docs(directory)
            if d["kind"] != "ConfigMap" or not d["metadata"]["name"].endswith("sidecar-config")
        ]
    )
    if name == "seldon-server":
        return  # Seldon's `mlserver` ServerConfig puts MLServer on 9000, not this directory
    assert re.search(rf"\b{MODEL_PORT}\b", model_side), (
        f"{name}: no model container on {MODEL_PORT}"
    )
