"""A real Prometheus scrapes a real sidecar in front of the toy model: every recording rule and
every dashboard query evaluates without error and returns data.

tests/prometheus_stack.py starts the processes, all on 127.0.0.1; the test fails rather than skips
without Debian's `prometheus`. Traffic covers what the rules read: predictions before and after a
shift (drift, low confidence), bad rows, an unknown model, an unparsed body, regression outputs,
and ground-truth labels posted to the sidecar's /feedback, some of them replacing earlier ones.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.demo.model import CLASSES, FEATURES, sample_rows
from tests.prometheus_stack import (
    DEADLINE,
    PROMETHEUS_DIR,
    ROOT,
    Prometheus,
    post,
    running,
    scrape_target,
    send,
    start_model,
    start_prometheus,
    start_sidecar,
    write_prometheus_config,
)

RULE_FILES = sorted(
    path
    for path in PROMETHEUS_DIR.rglob("*.yml")
    if path.name != "prometheus.yml" and "tests" not in path.relative_to(PROMETHEUS_DIR).parts
)
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

SIDECAR_CONFIG = {
    "host": "127.0.0.1",
    "port": 0,
    "metrics_port": 0,
    "preset": "kserve-v1",
    "health_path": "/v2/health/ready",
    "health_interval": 1.0,
    "model_name": "iris",
    "model_version": "1",
    "mapping": {"class_names": list(CLASSES), "feature_names": list(FEATURES)},
    # The toy model is a classifier. This route reads its probability of setosa as a regression
    # output (one row per request), so that regression values, their labels, MAE and RMSE flow too.
    "routes": [
        {
            "name": "setosa-score",
            "method": "POST",
            "path": "/v2/models/{model}/infer",
            "preset": "open-inference-v2",
            "mapping": {"feature_names": list(FEATURES), "value": "outputs[0].data[0]"},
        }
    ],
    "model_names": ["iris"],  # any other model name in a path is folded into __other__
    "max_body_bytes": 64 * 1024,  # so that one large request is relayed unparsed
    "features": {"petal_length": {"min": 0, "max": 10}},
}

Label = dict[str, Any]  # one item of a POST /feedback body


def rules_on_one_interval(tmp: Path) -> list[Path]:
    """Copies of the rule files with every group on the global 1 s interval."""
    rules = tmp / "rules"
    rules.mkdir()
    for path in RULE_FILES:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in document["groups"]:
            group.pop("interval", None)
        (rules / path.name).write_text(yaml.safe_dump(document), encoding="utf-8")
    return sorted(rules.glob("*.yml"))


def classify(proxy: str, rows: list[list[float]]) -> list[Label]:
    """POST rows to the classifier; a label per row: the predicted class, but another class for
    every fourth row, so that the confusion matrix has errors."""
    reply = send(f"{proxy}/v1/models/iris:predict", {"instances": rows})
    assert reply.status == 200
    request_id = reply.headers["X-Request-ID"]
    labels = []
    for row, probabilities in enumerate(json.loads(reply.body)["predictions"]):
        predicted = probabilities.index(max(probabilities))
        truth = predicted if row % 4 else (predicted + 1) % len(CLASSES)
        labels.append({"request_id": request_id, "row": row, "label": CLASSES[truth]})
    return labels


def score(proxy: str, rows: list[list[float]]) -> list[Label]:
    """POST each row to the regression route; labels 1 and 0 in turn (a setosa or not)."""
    labels = []
    for index, row in enumerate(rows):
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [row]}]}
        reply = send(f"{proxy}/v2/models/iris/infer", body)
        assert reply.status == 200
        labels.append({"request_id": reply.headers["X-Request-ID"], "label": index % 2})
    return labels


def send_reference_traffic(proxy: str, rng: random.Random) -> list[Label]:
    """Unshifted rows: the sidecar takes its first rows as the drift reference, then bins on.
    Labels for every predicted row."""
    labels = []
    for _ in range(50):
        labels += classify(proxy, sample_rows(rng, 30))
    return labels + score(proxy, sample_rows(rng, 20))


def send_traffic(proxy: str, rng: random.Random) -> list[Label]:
    """Shifted rows (drift, low confidence), bad rows, an unknown model name, and one body over
    max_body_bytes. Labels for the rows predicted before the bad requests."""
    labels = []
    for _ in range(40):
        labels += classify(proxy, sample_rows(rng, 30, shift=1.5))
    labels += score(proxy, sample_rows(rng, 20, shift=1.5))
    predict = f"{proxy}/v1/models/iris:predict"
    assert post(predict, {"instances": [[5.1, "wide", 1.4, 0.2]]}) == 400
    post(predict, {"instances": [[5.1, None, 11.0, 0.2]]})
    assert post(f"{proxy}/v1/models/unknown:predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]}) == 404
    assert post(predict, {"instances": sample_rows(rng, 3000)}) == 200
    return labels


def relabelled(labels: list[Label]) -> list[Label]:
    """The same rows with other labels: each replaces the row's earlier label."""
    return [
        {**item, "label": CLASSES[(CLASSES.index(item["label"]) + 1) % len(CLASSES)]}
        if isinstance(item["label"], str)
        else {**item, "label": 1 - item["label"]}
        for item in labels
    ]


def give_labels(
    stack: Prometheus, admin: str, new: list[Label], replacing: list[Label], logged: int
) -> None:
    """Once the prediction log holds `logged` rows (it is written in order, so these are the
    labelled ones), POST labels for new rows and labels replacing earlier ones."""
    stack.wait_until(
        f"sidecar_prediction_log_written_total >= {logged}", f"{logged} rows in the prediction log"
    )
    reply = send(f"{admin}/feedback", new + replacing)
    assert reply.status == 200, reply.body
    counts = {"matched": len(new), "unmatched": 0, "duplicate": len(replacing), "invalid": 0}
    assert json.loads(reply.body) == counts


def wait_for_samples(stack: Prometheus, selector: str) -> None:
    """Until Prometheus holds two scrapes of `selector`: later growth then shows in increase()."""
    stack.wait_until(f"count_over_time({selector}[1m]) >= 2", f"two scrapes of {selector}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("e2e")
    with running() as processes:
        config = {"upstream": start_model(tmp, processes), **SIDECAR_CONFIG}
        config["feedback"] = {"store": str(tmp / "predictions.db")}
        urls = start_sidecar(tmp, config, processes)
        targets = [{"targets": [scrape_target(urls["admin"])]}]
        scrape = [{"job_name": "sidecar", "static_configs": targets}]
        prometheus_config = write_prometheus_config(tmp, rules_on_one_interval(tmp), scrape)
        stack = start_prometheus(tmp, prometheus_config, processes)
        # Counters that first appear at their final value never show an increase: let Prometheus
        # see the drift bins and the label counters before later traffic makes them grow.
        rng = random.Random(7)
        first = send_reference_traffic(urls["proxy"], rng)
        wait_for_samples(stack, "ml_drift_bin_total")
        give_labels(stack, urls["admin"], first, [], logged=len(first))
        wait_for_samples(stack, "ml_labelled_total")
        wait_for_samples(stack, "ml_regression_labelled_total")
        second = send_traffic(urls["proxy"], rng)
        replacing = relabelled(first[:30] + first[-5:])
        give_labels(stack, urls["admin"], second, replacing, logged=len(first) + len(second))
        yield stack


def dashboard_queries() -> dict[str, str]:
    """Every panel query with Grafana's variables filled in as 'All', keyed by where it is."""
    queries = {}
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
                queries[f"{path.stem}: {panel['title']} [{target['refId']}]"] = expr
    return queries


def recorded_series() -> dict[str, str]:
    names = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    names[f"{path.name}: {rule['record']}"] = rule["record"]
    return names


def wait_for_data(stack: Prometheus, queries: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """Query until each returns data or the deadline passes: (errors by name, names still empty)."""
    pending, errors = dict(queries), {}
    deadline = time.monotonic() + DEADLINE
    while pending and time.monotonic() < deadline:
        for name, expr in list(pending.items()):
            answer = stack.query(expr)
            if answer["status"] != "success":
                errors[name] = answer.get("error", "?")
                del pending[name]
            elif answer["data"]["result"]:
                del pending[name]
        time.sleep(1)
    return errors, set(pending)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prometheus_scrapes_the_sidecar(stack: Prometheus) -> None:
    """The sidecar target is up, under job="sidecar", with the model's labels on its series."""
    errors, empty = wait_for_data(stack, {"up": 'up{job="sidecar"} == 1'})
    assert (errors, empty) == ({}, set()), stack.tails()
    info = stack.query("ml_model_info")["data"]["result"]
    assert [r["metric"]["model_name"] for r in info] == ["iris"]


def assert_all_return_data(stack: Prometheus, queries: dict[str, str]) -> None:
    """Every query parses, and each returns data."""
    errors, empty = wait_for_data(stack, queries)
    assert errors == {}
    missing = sorted(empty)
    assert missing == [], "no data for:\n" + "\n".join(missing) + "\n" + stack.tails()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_recording_rule_returns_data(stack: Prometheus) -> None:
    """Each recorded series, of every rule file, exists after traffic."""
    assert_all_return_data(stack, recorded_series())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_dashboard_query_returns_data(stack: Prometheus) -> None:
    """Each panel query of the four dashboards parses in a real Prometheus and returns data."""
    assert_all_return_data(stack, dashboard_queries())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_rule_evaluates_without_error(stack: Prometheus) -> None:
    """Prometheus reports every recording and alerting rule healthy once it has evaluated them."""

    def unhealthy() -> dict[str, str]:
        bad = {}
        for group in stack.get("/api/v1/rules")["data"]["groups"]:
            for rule in group["rules"]:
                if rule["health"] != "ok":
                    bad[rule["name"]] = rule.get("lastError") or rule["health"]
        return bad

    deadline = time.monotonic() + DEADLINE
    while unhealthy() and time.monotonic() < deadline:
        time.sleep(1)
    assert unhealthy() == {}
