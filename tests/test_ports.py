"""The sidecar's ports stay off every supported model server's default ports.

A sidecar shares its pod (or host) with the model server, so a port both want means one of them
fails to bind. The table below is each server's defaults and those of what often shares its pod or
host; docs/deploy.md, section 5, shows the same table, and a test here keeps the two equal.
The proxy port's default (8080) is left out on purpose: the sidecar takes the port clients already
call and the shipped manifests move the model off it (docs/deploy.md, section 5, says why;
tests/test_deploy_static.py checks the manifests).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sidecar.config import Config, load

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

DEFAULT_PORTS: dict[str, frozenset[int]] = {
    "MLflow": frozenset({5000, 8080}),  # `mlflow models serve`; the build-docker image
    "MLServer": frozenset({8080, 8081, 8082}),
    "KServe": frozenset({8080, 8081}),
    "KServe serverless pod": frozenset({8012, 8013, 8022, 9090, 9091, 9081, 9088}),
    "TorchServe": frozenset({8080, 8081, 8082, 7070, 7071}),
    "Triton": frozenset({8000, 8001, 8002}),
    "Seldon Core 1": frozenset({9000, 5000, 6000, 8000, 5001}),
    "vLLM": frozenset({8000}),
    "TGI": frozenset({3000, 80}),
    "llama.cpp": frozenset({8080}),
    "Ollama": frozenset({11434}),
    "Prometheus": frozenset({9090, 9091, 9093, 9094, 9100}),
    "Grafana": frozenset({3000}),
    "OpenTelemetry": frozenset({4317, 4318, 8888, 8889, 13133, 9464}),
    "Istio": frozenset(range(15000, 15091)),
    "Linkerd": frozenset({4140, 4143, 4191}),
}

_PORT_OR_RANGE = re.compile(r"\b(\d+)(?:-(\d+))?\b")


def servers_on(port: int) -> list[str]:
    """Who else listens on `port` by default."""
    return [name for name, ports in DEFAULT_PORTS.items() if port in ports]


def sidecar_ports(config: Config) -> dict[str, int]:
    """The ports a sidecar with this config listens on (gRPC only when configured)."""
    ports = {"port": config.port, "metrics_port": config.metrics_port}
    if config.grpc_port is not None:
        ports["grpc_port"] = config.grpc_port
    return ports


def ports_in(text: str) -> frozenset[int]:
    """Every port a cell of the docs' table names, ranges such as 15000-15090 included."""
    ports: set[int] = set()
    for match in _PORT_OR_RANGE.finditer(text):
        first, last = int(match[1]), int(match[2] or match[1])
        ports.update(range(first, last + 1))
    return frozenset(ports)


def documented_ports() -> dict[str, frozenset[int]]:
    """The `| neighbour | default ports |` table of docs/deploy.md's Ports section."""
    section = DEPLOY_DOC.read_text(encoding="utf-8").split("\n## 5. Ports\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0] == "| neighbour | default ports |", rows[0]
    cells = [row.strip("|").split("|", 1) for row in rows[1:]]
    return {name.strip(): ports_in(ports) for name, ports in cells}


def test_ports_in_reads_single_ports_and_ranges() -> None:
    assert ports_in("HTTP 8080, gRPC 7070 and 7071; sidecar 15000-15002") == {
        7070, 7071, 8080, 15000, 15001, 15002,
    }  # fmt: skip


def test_servers_on_names_every_server_of_a_port() -> None:
    assert servers_on(8081) == ["MLServer", "KServe", "TorchServe"]
    assert servers_on(9101) == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_listens_on_no_servers_default_port(path: Path) -> None:
    """Each ready-made config runs beside any model server left on its default ports."""
    config = load(path, environ={})
    clashes = {key: servers_on(port) for key, port in sidecar_ports(config).items()}
    assert {key: names for key, names in clashes.items() if names} == {}


def test_admin_and_grpc_port_defaults_are_no_servers_default_port() -> None:
    """With no config at all, the admin port binds beside any model server (the proxy port is
    8080 on purpose: see the module docstring)."""
    ports = sidecar_ports(Config(upstream="http://127.0.0.1:9000"))
    admin_and_grpc = {key: port for key, port in ports.items() if key != "port"}
    assert {key: servers_on(port) for key, port in admin_and_grpc.items() if servers_on(port)} == {}


def test_the_docs_ports_table_is_this_one() -> None:
    """docs/deploy.md lists the same servers with the same ports as DEFAULT_PORTS."""
    assert documented_ports() == DEFAULT_PORTS
