"""Real processes for the tests that run Prometheus: the toy model, sidecars and Prometheus itself,
each on an ephemeral port of 127.0.0.1 with its log in the test's directory, and a small client
for Prometheus's HTTP API.

The Prometheus binary comes from Debian's `prometheus` package (scripts/test installs it); a test
fails rather than skips without it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DEADLINE = 90.0  # seconds to wait for a process to come up or a query to return data

T = TypeVar("T")

# The toy model server (sidecar.demo.model) on an ephemeral port, which it prints once listening.
MODEL_SERVER = """
import asyncio
from aiohttp import web
from sidecar.demo.model import make_model_app

async def main():
    runner = web.AppRunner(make_model_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Message
    body: bytes


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus, and the directory holding its log and those of its targets."""

    url: str
    process: subprocess.Popen[Any]
    directory: Path

    def query(self, expr: str) -> dict[str, Any]:
        """The API's answer to an instant query: status success with data, or error."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:  # 400: the expression does not parse
            body = json.load(exc)
        return body

    def vector(self, expr: str) -> list[dict[str, Any]]:
        """The samples of an instant query that must succeed."""
        answer = self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.load(response)

    def wait_until(self, expr: str, what: str) -> list[dict[str, Any]]:
        """Query until `expr` returns data (a comparison filters until it holds); that data."""
        found = wait_for(lambda: self.vector(expr), self.process, what)
        assert found, f"Prometheus exited while waiting for {what}\n{self.tails()}"
        return found

    def tails(self) -> str:
        """The end of every log of the stack, for assertion messages."""
        return "\n".join(
            f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:]
            for path in sorted(self.directory.glob("*.log"))
        )


@contextlib.contextmanager
def running() -> Iterator[list[subprocess.Popen[Any]]]:
    """A list to add started processes to; on exit each is stopped, the last started first."""
    processes: list[subprocess.Popen[Any]] = []
    try:
        yield processes
    finally:
        for process in reversed(processes):
            stop(process)


def stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed: apt-get install -y prometheus")
    return path


def wait_for(predicate: Callable[[], T], process: subprocess.Popen[Any], what: str) -> T | None:
    """Poll until `predicate` returns something truthy (returned), or `process` exits (None)."""
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
    """The toy model server; its base URL."""
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
    tmp: Path, config: dict[str, Any], processes: list[subprocess.Popen[Any]], name: str = "sidecar"
) -> dict[str, str]:
    """`sidecar serve` with `config` (ports 0: any free ones); its proxy and admin URLs."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = tmp / f"{name}.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--config", str(path)],
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

    entry = wait_for(serving, process, name)
    assert entry, log.read_text()
    return {"proxy": entry["proxy"], "admin": entry["admin"]}


def scrape_target(admin_url: str) -> str:
    """A sidecar's scrape target (host:port of its admin port)."""
    return urllib.parse.urlsplit(admin_url).netloc


def write_prometheus_config(
    tmp: Path, rule_files: list[Path], scrape_configs: list[dict[str, Any]]
) -> Path:
    """A config that scrapes and evaluates every second, so that tests wait seconds, not minutes.
    Groups with an `interval` of their own keep it."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": scrape_configs,
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def start_prometheus(tmp: Path, config: Path, processes: list[subprocess.Popen[Any]]) -> Prometheus:
    binary = prometheus_binary()
    # Prometheus takes a port number, not a socket: a free one now may be taken by the time it
    # binds, so try another when it exits.
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
            return Prometheus(url, process, tmp)
        process.wait()
    pytest.fail("Prometheus did not start:\n" + (tmp / "prometheus.log").read_text()[-3000:])


def send(url: str, body: Any) -> Reply:
    """POST a JSON body (or these bytes); the reply, whatever its status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Reply(int(response.status), response.headers, response.read())
    except urllib.error.HTTPError as exc:
        return Reply(int(exc.code), exc.headers, exc.read())


def post(url: str, body: Any) -> int:
    """POST a JSON body (or these bytes); the status code."""
    return send(url, body).status
