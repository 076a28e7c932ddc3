"""Real captured traffic, replayed through the sidecar with the shipped config for its server.

A replay upstream answers each recorded request with the recorded status, headers and body. The
client must get exactly that, and the sidecar must read every exchange without one
instrumentation error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Sidecar
from sidecar.config import load
from tests.bare_response import BareResponse
from tests.fixtures_util import FIXTURES

CONFIGS = Path(__file__).resolve().parents[1] / "config"
SERVER_CONFIGS = {
    "mlserver": "mlserver",
    "mlflow": "mlflow",
    "kserve": "kserve",
    "torchserve": "torchserve",
}
INSTRUMENTATION_ERRORS = {"request_parse", "response_parse", "mapping"}
SKIPPED_HEADERS = {"transfer-encoding", "connection", "keep-alive"}


def exchanges(server: str) -> list[dict[str, Any]]:
    return list(json.loads((FIXTURES / f"{server}.json").read_text())["exchanges"])


ReplayKey = tuple[str, str, str, bytes]


def replay_key(method: str, path: str, content_type: str, body: bytes) -> ReplayKey:
    """Some recordings differ only in Content-Type (TorchServe's form-encoded error)."""
    return method, path, content_type, body


@pytest.fixture
async def replay() -> AsyncIterator[tuple[str, dict[ReplayKey, dict[str, Any]]]]:
    recorded: dict[ReplayKey, dict[str, Any]] = {}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.content.read()
        content_type = request.headers.get("Content-Type", "")
        key = replay_key(request.method, request.raw_path, content_type, body)
        answer = recorded[key]["response"]
        headers = [(k, v) for k, v in answer["headers"] if k.lower() not in SKIPPED_HEADERS]
        response = BareResponse(status=answer["status"], headers=headers)
        await response.prepare(request)
        await response.write_eof(answer["body"].encode())
        return response

    runner = web.ServerRunner(web.Server(handler, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", recorded
    await runner.cleanup()


@pytest.mark.parametrize("server", sorted(SERVER_CONFIGS))
async def test_shipped_config_reads_real_traffic(server, replay):
    """Every recorded exchange comes back as recorded, and none is an instrumentation error."""
    upstream, recorded = replay
    traffic = exchanges(server)
    overrides = {"upstream": upstream, "host": "127.0.0.1", "port": 0, "metrics_port": 0}
    config = load(CONFIGS / f"{SERVER_CONFIGS[server]}.yaml", environ={}, overrides=overrides)
    sidecar = Sidecar(config, registry=CollectorRegistry())
    await sidecar.start()
    try:
        # The same request got different answers from the predict and the predict_proba
        # deployments (names with "proba"), so each deployment is replayed on its own.
        for proba in (False, True):
            recorded.clear()
            phase = [e for e in traffic if ("proba" in e["name"]) == proba]
            for exchange in phase:
                recorded[_key_of(exchange["request"])] = exchange
            await _send_all(sidecar, phase)
        async with (
            aiohttp.ClientSession() as session,
            session.get(sidecar.admin_url + "/metrics") as response,
        ):
            text = await response.text()
    finally:
        await sidecar.stop()
    totals = _totals(text)
    assert totals["ml_requests_total"] == len(traffic)
    assert totals["ml_predictions_total"] > 0
    assert not INSTRUMENTATION_ERRORS & totals["error_types"]


def _key_of(request: dict[str, Any]) -> ReplayKey:
    content_type = {k.lower(): v for k, v in request["headers"]}.get("content-type", "")
    return replay_key(request["method"], request["path"], content_type, request["body"].encode())


async def _send_all(sidecar: Sidecar, traffic: list[dict[str, Any]]) -> None:
    """Send each recorded request as recorded; the client must get the recorded answer."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for exchange in traffic:
            request = exchange["request"]
            headers = [(k, v) for k, v in request["headers"] if k.lower() != "host"]
            async with session.request(
                request["method"],
                sidecar.proxy_url + request["path"],
                data=request["body"].encode(),
                headers=headers,
                skip_auto_headers=("Content-Type", "User-Agent", "Accept", "Accept-Encoding"),
            ) as response:
                assert response.status == exchange["response"]["status"], exchange["name"]
                assert await response.read() == exchange["response"]["body"].encode()


def _totals(text: str) -> dict[str, Any]:
    totals: dict[str, Any] = {
        "ml_requests_total": 0.0,
        "ml_predictions_total": 0.0,
        "error_types": set(),
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("ml_requests_total", "ml_predictions_total"):
                totals[sample.name] += sample.value
            if sample.name == "ml_errors_total":
                totals["error_types"].add(sample.labels["error_type"])
    return totals
