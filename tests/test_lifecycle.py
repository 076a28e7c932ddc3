"""Admin port, readiness, graceful shutdown and the command line, with real processes."""

from __future__ import annotations

import asyncio
import gzip
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import (
    CannedUpstream,
    ServeProcess,
    StartServe,
    assert_sample,
    run_cli,
    scrape,
)


async def test_admin_endpoints(client, canned_upstream, sidecar):
    """/healthz is alive, /readyz follows the upstream's health path, /metrics serves text."""
    async with client.get(sidecar.admin_url + "/healthz") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "alive"
    async with client.get(sidecar.admin_url + "/readyz") as response:
        assert response.status == 200
    async with client.get(sidecar.admin_url + "/metrics") as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        assert response.headers["Content-Encoding"] == "gzip"  # aiohttp's client takes gzip
        assert "ml_model_info" in gzip.decompress(await response.read()).decode()


async def test_openmetrics_by_accept_header(client, sidecar):
    """A scraper that asks for OpenMetrics gets it, with its # EOF trailer."""
    accept = "application/openmetrics-text; version=1.0.0"
    async with client.get(sidecar.admin_url + "/metrics", headers={"Accept": accept}) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert gzip.decompress(await response.read()).endswith(b"# EOF\n")


async def test_readiness_follows_upstream(client, canned_upstream: CannedUpstream, start_sidecar):
    """/readyz turns 503 with a reason when the health path fails, and back when it recovers."""
    sidecar = await start_sidecar(canned_upstream.url, health_path="/health", health_interval=0.05)
    canned_upstream.healthy = False
    for _ in range(200):
        async with client.get(sidecar.admin_url + "/readyz") as response:
            if response.status == 503:
                assert "answered 503" in (await response.json())["reason"]
                break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("readiness never turned 503")
    assert_sample(await scrape(sidecar), "sidecar_upstream_up", 0)


async def test_unreachable_upstream_is_not_ready(client, start_sidecar, refusing_url):
    """With nothing listening upstream, /readyz says so."""
    sidecar = await start_sidecar(refusing_url, health_path="/ping")
    async with client.get(sidecar.admin_url + "/readyz") as response:
        assert response.status == 503
        assert "unreachable" in (await response.json())["reason"]


async def test_proxy_port_has_no_admin_paths(client, canned_upstream, sidecar):
    """/metrics on the proxy port belongs to the model server."""
    async with client.get(sidecar.proxy_url + "/metrics") as response:
        assert response.status == 404
        assert await response.read() == b"no such path"
    assert canned_upstream.seen[-1]["path_qs"] == "/metrics"


async def test_red_metrics_after_traffic(client, canned_upstream, sidecar):
    """Requests, durations, sizes and overhead are recorded under a bounded route label."""
    for _ in range(3):
        async with client.post(sidecar.proxy_url + "/echo/abc?x=1", data=b"12345") as response:
            await response.read()
    text = await scrape(sidecar)
    labels = {"model_name": "model", "model_version": "unknown", "route": "other"}
    assert_sample(text, "ml_requests_total", 3, method="POST", code="200", **labels)
    assert_sample(text, "ml_request_duration_seconds_count", 3, **labels)
    assert_sample(text, "ml_upstream_duration_seconds_count", 3, **labels)
    assert_sample(text, "ml_request_size_bytes_sum", 15, **labels)
    assert_sample(text, "ml_response_size_bytes_sum", 15, **labels)
    assert_sample(text, "sidecar_overhead_seconds_count", 3)
    assert_sample(text, "ml_requests_in_progress", 0)
    assert "/echo/abc" not in text


async def _start_process(
    serve: StartServe, upstream: str, *extra: str
) -> tuple[ServeProcess, int, int]:
    """`sidecar serve` on ports it picks (0), read back from its "serving" line: (the process,
    proxy port, admin port)."""
    served = await serve(
        *("--upstream", upstream, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"),
        *extra,
    )
    return (served, *await served.ports())


async def test_sigterm_keeps_serving_with_readyz_failing_for_the_shutdown_delay(
    canned_upstream, serve
):
    """Kubernetes drops a pod's endpoints as it sends SIGTERM, and load balancers follow a few
    seconds later: for shutdown_delay (5 s by default) /readyz says 503 while new connections
    are still answered, then the sidecar exits 0."""
    served, port, metrics_port = await _start_process(serve, canned_upstream.url)
    served.process.send_signal(signal.SIGTERM)
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.get(f"http://127.0.0.1:{metrics_port}/readyz") as response:
                status, answer = response.status, await response.json()
            if status == 503:
                break
            await asyncio.sleep(0.02)
        assert (status, answer["reason"]) == (503, "draining: shutting down")
    async with (
        aiohttp.ClientSession() as session,  # a new connection, after the signal
        session.post(f"http://127.0.0.1:{port}/echo", data=b"still here") as response,
    ):
        assert (response.status, await response.read()) == (200, b"still here")
    assert (await served.exited())[0] == 0


async def test_sigterm_drains_in_flight_requests(canned_upstream, serve):
    """SIGTERM: the in-flight slow request still completes, new connections are refused, exit 0."""
    served, port, _ = await _start_process(serve, canned_upstream.url, "--drain-timeout", "20")
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(session.get(f"http://127.0.0.1:{port}/slow"))
        await asyncio.wait_for(canned_upstream.slow_started.wait(), timeout=10)
        served.process.send_signal(signal.SIGTERM)
        response = await slow
        assert response.status == 200
        assert await response.text() == "late"
    code, lines = await served.exited()
    assert code == 0
    assert any(line["msg"] == "signal received, draining" for line in lines)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/echo"):
            pass


async def test_logs_are_json_lines_without_per_request_lines(canned_upstream, serve):
    """The process logs JSON objects and stays quiet per request at the default level."""
    served, port, _ = await _start_process(serve, canned_upstream.url)
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.get(f"http://127.0.0.1:{port}/echo") as response:
                await response.read()
    served.process.send_signal(signal.SIGTERM)
    code, lines = await served.exited()
    assert code == 0
    messages = [line["msg"] for line in lines]
    assert messages[-3:] == ["serving", "signal received, draining", "stopped"]
    assert set(messages) <= {
        "upstream readiness changed",
        "serving",
        "signal received, draining",
        "stopped",
    }


def test_bad_config_exits_2_before_serving(tmp_path: Path):
    """A bad config file stops `serve` with exit code 2 and the reason on stderr."""
    config = tmp_path / "bad.yaml"
    config.write_text("upstream: http://127.0.0.1:1\nport: eighty\n")
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert "key `port` has value 'eighty'" in result.stderr


def test_help_explains(capsys):
    """`sidecar --help` lists the commands; `serve --help` names the env variables."""
    from sidecar.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--metrics-port" in out
    assert "SIDECAR_METRICS_PORT" in out
