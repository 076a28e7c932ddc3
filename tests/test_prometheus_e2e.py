"""A real Prometheus scrapes a real sidecar in front of the toy model: every recording rule and
every dashboard query evaluates without error and returns data.

The Prometheus binary comes from Debian's `prometheus` package (scripts/test installs it); the test
fails rather than skips without it. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.demo import sample_rows

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted(
    path
    for path in PROMETHEUS_DIR.rglob("*.yml")
    if path.name != "prometheus.yml" and "tests" not in path.relative_to(PROMETHEUS_DIR).parts
)
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
DEADLINE = 90.0  # seconds to wait for a scrape and rule evaluations to produce a series

# Queries that cannot have data in this setup, and why.
NO_DATA_HERE = {
    "ml_prediction_value_bucket": "the toy model is a classifier: no regression outputs",
}
# Rule files whose series this test does not produce (their inputs need other traffic), and why.
# Prometheus still loads and evaluates them: test_every_rule_evaluates_without_error covers them.
NOT_EXERCISED = {
    "feedback_rules.yml": "needs labels posted to /feedback (ground truth has its own tests)",
}

# The toy model server (sidecar.demo) on an ephemeral port, which it prints once listening.
MODEL_SERVER = """
import asyncio
from aiohttp import web
from sidecar.demo import make_model_app

async def main():
    runner = web.AppRunner(make_model_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

SIDECAR_CONFIG = {
    "host": "127.0.0.1",
    "port": 0,
    "metrics_port": 0,
    "preset": "kserve-v1",
    "health_path": "/v2/health/ready",
    "health_interval": 1.0,
    "model_name": "iris",
    "model_version": "1",
    "mapping": {
        "class_names": ["setosa", "versicolor", "virginica"],
        "feature_names": ["sepal_length", "sepal_width", "petal_length", "petal_width"],
    },
    "model_names": ["iris"],  # any other model name in a path is folded into __other__
    "max_body_bytes": 64 * 1024,  # so that one large request is relayed unparsed
    "features": {"petal_length": {"min": 0, "max": 10}},
}


@dataclass
class Stack:
    prometheus: str
    logs: dict[str, Path]

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:  # 400: the expression does not parse
            body = json.load(exc)
        return body

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.prometheus + path, timeout=10) as response:
            return json.load(response)

    def tails(self) -> str:
        return "\n".join(
            f"--- {name}\n" + path.read_text(errors="replace")[-3000:]
            for name, path in self.logs.items()
        )


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed: apt-get install -y prometheus")
    return path


def free_port() -> int:
    # Prometheus takes a port number, not a socket: bind, read, close, and retry on a clash.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(predicate: Any, process: subprocess.Popen[Any], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        if process.poll() is not None:
            return None
        time.sleep(0.1)
    pytest.fail(f"{what} did not come up within {DEADLINE:.0f} s")


def start_model(tmp: Path, processes: list[subprocess.Popen[Any]]) -> str:
    with (tmp / "model.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", MODEL_SERVER], stdout=subprocess.PIPE, stderr=log, text=True
        )
    processes.append(process)
    assert process.stdout is not None
    port = process.stdout.readline().strip()
    assert port.isdigit(), (tmp / "model.log").read_text()
    return f"http://127.0.0.1:{port}"


def start_sidecar(
    tmp: Path, upstream: str, processes: list[subprocess.Popen[Any]]
) -> dict[str, str]:
    config = tmp / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"upstream": upstream, **SIDECAR_CONFIG}), encoding="utf-8")
    log = tmp / "sidecar.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    processes.append(process)

    def serving() -> dict[str, str] | None:
        for line in log.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("msg") == "serving":
                entry: dict[str, str] = json.loads(line)
                return entry
        return None

    entry = wait_for(serving, process, "the sidecar")
    assert entry, log.read_text()
    return {"proxy": entry["proxy"], "admin": entry["admin"]}


def write_prometheus_config(tmp: Path, admin_url: str) -> Path:
    rules = tmp / "rules"
    rules.mkdir()
    for path in RULE_FILES:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in document["groups"]:
            group.pop("interval", None)  # every group on the 1 s global interval
        (rules / path.name).write_text(yaml.safe_dump(document), encoding="utf-8")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules / "*.yml")],
        "scrape_configs": [
            {
                "job_name": "sidecar",
                "static_configs": [{"targets": [urllib.parse.urlsplit(admin_url).netloc]}],
            }
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def start_prometheus(tmp: Path, config: Path, processes: list[subprocess.Popen[Any]]) -> str:
    binary = prometheus_binary()
    for attempt in range(5):
        url = f"http://127.0.0.1:{free_port()}"
        with (tmp / "prometheus.log").open("w") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / f'data{attempt}'}",
                    f"--web.listen-address={url.removeprefix('http://')}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        processes.append(process)

        def ready(url: str = url) -> bool:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        if wait_for(ready, process, "Prometheus"):
            return url
        process.wait()  # it exited: most likely the port was taken meanwhile; try another
    pytest.fail("Prometheus did not start:\n" + (tmp / "prometheus.log").read_text()[-3000:])


def post(url: str, body: Any) -> int:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def send_reference_traffic(proxy: str, rng: random.Random) -> None:
    """Unshifted rows: the sidecar takes its first rows as the drift reference, then bins on."""
    for _ in range(50):
        assert post(f"{proxy}/v1/models/iris:predict", {"instances": sample_rows(rng, 30)}) == 200


def send_traffic(proxy: str, rng: random.Random) -> None:
    """Shifted rows (drift, low confidence), bad rows, an unknown model name, and one body over
    max_body_bytes."""
    predict = f"{proxy}/v1/models/iris:predict"
    for _ in range(40):
        assert post(predict, {"instances": sample_rows(rng, 30, shift=1.5)}) == 200
    assert post(predict, {"instances": [[5.1, "wide", 1.4, 0.2]]}) == 400
    post(predict, {"instances": [[5.1, None, 11.0, 0.2]]})
    assert post(f"{proxy}/v1/models/unknown:predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]}) == 404
    assert post(predict, {"instances": sample_rows(rng, 3000)}) == 200


def wait_for_samples(stack: Stack, selector: str, process: subprocess.Popen[Any]) -> None:
    """Until Prometheus holds two scrapes of `selector`: later growth then shows in increase()."""

    def scraped_twice() -> bool:
        answer = stack.query(f"count_over_time({selector}[1m]) >= 2")
        return bool(answer["status"] == "success" and answer["data"]["result"])

    assert wait_for(scraped_twice, process, f"two scrapes of {selector}"), stack.tails()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    processes: list[subprocess.Popen[Any]] = []
    logs = {name: tmp / f"{name}.log" for name in ("model", "sidecar", "prometheus")}
    try:
        upstream = start_model(tmp, processes)
        urls = start_sidecar(tmp, upstream, processes)
        prometheus = start_prometheus(tmp, write_prometheus_config(tmp, urls["admin"]), processes)
        stack = Stack(prometheus, logs)
        # Counters that first appear at their final value never show an increase: let Prometheus
        # see the drift bins before the shifted traffic makes them grow.
        rng = random.Random(7)
        send_reference_traffic(urls["proxy"], rng)
        wait_for_samples(stack, "ml_drift_bin_total", processes[-1])
        send_traffic(urls["proxy"], rng)
        yield stack
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()


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
                if "record" in rule and path.name not in NOT_EXERCISED:
                    names[f"{path.name}: {rule['record']}"] = rule["record"]
    return names


def wait_for_data(stack: Stack, queries: dict[str, str]) -> tuple[dict[str, str], set[str]]:
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


def expected_empty(queries: dict[str, str]) -> set[str]:
    return {name for name, expr in queries.items() if any(m in expr for m in NO_DATA_HERE)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prometheus_scrapes_the_sidecar(stack: Stack) -> None:
    """The sidecar target is up, under job="sidecar", with the model's labels on its series."""
    errors, empty = wait_for_data(stack, {"up": 'up{job="sidecar"} == 1'})
    assert (errors, empty) == ({}, set()), stack.tails()
    info = stack.query("ml_model_info")["data"]["result"]
    assert [r["metric"]["model_name"] for r in info] == ["iris"]


def assert_all_return_data(stack: Stack, queries: dict[str, str]) -> None:
    """Every query parses, and each returns data unless it is expected to stay empty."""
    errors, empty = wait_for_data(stack, queries)
    assert errors == {}
    missing = sorted(empty - expected_empty(queries))
    assert missing == [], "no data for:\n" + "\n".join(missing) + "\n" + stack.tails()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_recording_rule_returns_data(stack: Stack) -> None:
    """Each recorded series (but those of NOT_EXERCISED files) exists after traffic."""
    assert_all_return_data(stack, recorded_series())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    """Each panel query of the four dashboards parses in a real Prometheus and returns data."""
    assert_all_return_data(stack, dashboard_queries())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_rule_evaluates_without_error(stack: Stack) -> None:
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
