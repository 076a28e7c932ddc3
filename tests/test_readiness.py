"""/readyz from the proxy's own traffic: a refused connection makes the upstream not ready at
once, a reply ready again, without waiting for the periodic probe (health_interval is 30 s here).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from sidecar.readiness import UpstreamProbe
from tests.conftest import StartSidecar, assert_sample, scrape

SLOW_PROBES = 30.0  # health_interval: the periodic probe cannot be what notices in these tests


@dataclass
class RestartableUpstream:
    """A model server that can be stopped and started again on the same port. /health answers
    200 while `healthy`, 503 otherwise (a model not loaded); every other path 200."""

    healthy: bool = True
    port: int = 0
    health_checks: int = 0
    health_gate: asyncio.Event = field(default_factory=asyncio.Event)  # /health waits on it
    _runner: web.ServerRunner | None = None

    def __post_init__(self) -> None:
        self.health_gate.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        runner = web.ServerRunner(web.Server(self._handle, access_log=None), shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        if request.path == "/health":
            self.health_checks += 1
            await self.health_gate.wait()
            return web.Response(status=200 if self.healthy else 503)
        return web.Response(text="ok")


@asynccontextmanager
async def restartable_upstream() -> AsyncIterator[RestartableUpstream]:
    server = RestartableUpstream()
    await server.start()
    try:
        yield server
    finally:
        server.health_gate.set()
        await server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[RestartableUpstream]:
    async with restartable_upstream() as server:
        yield server


async def until(condition: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """Wait until `condition` holds, failing the test after `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await condition():
        if loop.time() > deadline:
            pytest.fail(f"{what} within {seconds} s")
        await asyncio.sleep(0.01)


async def readyz(client: aiohttp.ClientSession, admin_url: str) -> tuple[int, str]:
    async with client.get(admin_url + "/readyz") as response:
        body: dict[str, Any] = await response.json()
        return response.status, body["reason"]


async def proxied(client: aiohttp.ClientSession, proxy_url: str) -> int:
    async with client.get(proxy_url + "/predict") as response:
        await response.read()
        return response.status


async def test_a_refused_request_fails_readiness_and_a_reply_restores_it(
    client: aiohttp.ClientSession, upstream: RestartableUpstream, start_sidecar: StartSidecar
) -> None:
    """The upstream stops: the first proxied request gets a 502 and /readyz says 503 by the time
    the client has it, and the gauge is 0. The upstream comes back: the
    first proxied reply makes /readyz 200 and the gauge 1 again."""
    sidecar = await start_sidecar(upstream.url, health_path="/health", health_interval=SLOW_PROBES)
    assert (await readyz(client, sidecar.admin_url))[0] == 200

    await upstream.stop()
    assert await proxied(client, sidecar.proxy_url) == 502
    # The reason is the proxy's, or already that of the probe the failure started.
    status, reason = await readyz(client, sidecar.admin_url)
    assert status == 503
    assert "cannot connect to" in reason.lower()
    assert_sample(await scrape(sidecar), "sidecar_upstream_up", 0)

    await upstream.start()
    assert await proxied(client, sidecar.proxy_url) == 200
    assert await readyz(client, sidecar.admin_url) == (200, f"{upstream.url}/health answered 200")
    assert_sample(await scrape(sidecar), "sidecar_upstream_up", 1)


async def test_a_reply_does_not_overrule_a_health_path_that_says_not_ready(
    client: aiohttp.ClientSession, upstream: RestartableUpstream, start_sidecar: StartSidecar
) -> None:
    """While /health answers 503 (model not loaded), a proxied reply after an outage proves the
    server is up, not that it is ready: /readyz stays 503 with the health path's reason. Once
    /health says 200, the probe, every second while not ready, notices without any traffic."""
    upstream.healthy = False
    sidecar = await start_sidecar(upstream.url, health_path="/health", health_interval=SLOW_PROBES)
    not_loaded = (503, f"{upstream.url}/health answered 503")
    assert await readyz(client, sidecar.admin_url) == not_loaded

    await upstream.stop()
    assert await proxied(client, sidecar.proxy_url) == 502
    assert (await readyz(client, sidecar.admin_url))[0] == 503
    await upstream.start()
    assert await proxied(client, sidecar.proxy_url) == 200
    assert await readyz(client, sidecar.admin_url) == not_loaded

    upstream.healthy = True

    async def ready() -> bool:
        return (await readyz(client, sidecar.admin_url))[0] == 200

    await until(ready, 3.0, "ready")  # a probe comes every second


async def test_failures_during_a_probe_queue_one_more_probe_not_many(
    upstream: RestartableUpstream,
) -> None:
    """Proxy failures while a probe is in flight start no probe of their own: one more runs
    after it (the one in flight may have been answered before the upstream went away), and
    that one's answer makes the upstream ready again."""
    up = Gauge("up", "", registry=CollectorRegistry())
    probe = UpstreamProbe(f"{upstream.url}/health", interval=SLOW_PROBES, up=up)
    await probe.start()
    try:
        assert probe.status[0]
        upstream.health_gate.clear()  # the next probe hangs until the gate opens
        probe.upstream_failed("connection refused")

        async def probing() -> bool:
            return upstream.health_checks == 2

        await until(probing, 1.0, "the failure started a probe")
        for _ in range(5):
            probe.upstream_failed("connection refused")
        assert probe.status == (False, "proxy traffic: connection refused")
        upstream.health_gate.set()

        async def ready() -> bool:
            return probe.status[0]

        await until(ready, 1.0, "ready")
        assert probe.status == (True, f"{upstream.url}/health answered 200")
        assert upstream.health_checks == 3  # at start, the one in flight, one after it
    finally:
        await probe.stop()
