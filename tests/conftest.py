"""Shared fixtures: a scripted upstream on an ephemeral port, the sidecar in process, metrics."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Sidecar
from sidecar.config import Config
from sidecar.demo.model import make_model_app, serve_app
from tests.bare_response import BareResponse

BIG = 20 * 1024 * 1024


def payload_bytes(size: int) -> bytes:
    """Deterministic incompressible-looking bytes of any size (every byte value appears)."""
    block = hashlib.sha256(b"sidecar").digest() * 2048 + bytes(range(256))
    return (block * (size // len(block) + 1))[:size]


@dataclass
class CannedUpstream:
    """A real HTTP server with scripted answers. `seen` holds every request it received."""

    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    sse_release: asyncio.Event = field(default_factory=asyncio.Event)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    slow_abandoned: asyncio.Event = field(default_factory=asyncio.Event)
    healthy: bool = True
    connections: set[tuple[str, int]] = field(default_factory=set)
    stream_abandoned: asyncio.Event = field(default_factory=asyncio.Event)


async def _canned_handler(upstream: CannedUpstream, request: web.BaseRequest) -> web.StreamResponse:
    body = await request.content.read()  # no size cap: this upstream takes 20 MB bodies
    upstream.seen.append(
        {
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": list(request.headers.items()),
            "body": body,
        }
    )
    path = request.path
    if request.transport is not None:
        upstream.connections.add(request.transport.get_extra_info("peername"))
    if path == "/health":
        return web.Response(status=200 if upstream.healthy else 503, text="ok")
    if path.startswith("/echo"):
        return web.Response(
            body=body, headers={"Content-Type": "application/octet-stream", "X-Echo": "1"}
        )
    if path.startswith("/bytes/"):
        return web.Response(
            body=payload_bytes(int(path.rsplit("/", 1)[1])), content_type="application/octet-stream"
        )
    if path == "/json":
        return web.json_response({"predictions": [[0.1, 0.9]]}, headers={"Set-Cookie": "a=1"})
    if path == "/no-content-type":
        # Like TorchServe. aiohttp's own responses always add a Content-Type; this one does not.
        bare = BareResponse(headers={"Content-Length": "20"})
        await bare.prepare(request)
        await bare.write(b'{\n  "setosa": 0.98\n}')
        await bare.write_eof()
        return bare
    if path == "/chunked":
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for index in range(5):
            await response.write(f"chunk {index}\n".encode())
        await response.write_eof()
        return response
    if path == "/sse":
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        # The test releases the rest only after it has seen the first event through the proxy.
        await upstream.sse_release.wait()
        for index in range(3):
            await response.write(f"data: event {index}\n\n".encode())
        await response.write_eof()
        return response
    if path == "/sse-forever":
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        # Then silence: only the proxy hanging up ends this request.
        for _ in range(1000):
            if request.transport is None or request.transport.is_closing():
                upstream.stream_abandoned.set()
                break
            await asyncio.sleep(0.01)
        return response
    if path == "/gzip":
        return web.Response(
            body=gzip.compress(b'{"compressed": true}' * 50),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
    if path.startswith("/status/"):
        return web.Response(status=int(path.rsplit("/", 1)[1]))
    if path == "/slow":
        upstream.slow_started.set()
        for _ in range(500):  # about 5 s, unless the proxy hangs up first
            if request.transport is None or request.transport.is_closing():
                upstream.slow_abandoned.set()
                break
            await asyncio.sleep(0.01)
        return web.Response(text="late")
    if path == "/reset":
        response = web.StreamResponse(
            headers={"Content-Length": "100000", "Content-Type": "text/plain"}
        )
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return response
    if path == "/close-after":
        # Answers as keep-alive, then hangs up: a pooled connection the upstream closed.
        response = web.Response(text="bye")
        await response.prepare(request)
        await response.write_eof()
        assert request.transport is not None
        request.transport.close()
        return response
    if path == "/error":
        return web.Response(status=500, text="Internal Server Error")
    return web.Response(status=404, text="no such path")


@pytest.fixture
async def canned_upstream() -> AsyncIterator[CannedUpstream]:
    upstream = CannedUpstream()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return await _canned_handler(upstream, request)

    runner = web.ServerRunner(web.Server(handler, access_log=None), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield upstream
    upstream.sse_release.set()
    await runner.cleanup()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on uvloop, as `sidecar serve` does."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def toy_model() -> AsyncIterator[str]:
    """The bundled toy iris model (KServe V1 and V2) on an ephemeral port."""
    async with serve_app(make_model_app()) as url:
        yield url


StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start_sidecar() -> AsyncIterator[StartSidecar]:
    """Start sidecars on ephemeral ports with a fresh registry each; all are stopped at the end."""
    started: list[Sidecar] = []

    async def start(upstream: str, **settings: Any) -> Sidecar:
        settings.setdefault("drain_timeout", 1.0)
        settings.setdefault("shutdown_delay", 0.0)  # no load balancer to wait for
        config = Config(upstream=upstream, host="127.0.0.1", port=0, metrics_port=0, **settings)
        sidecar = Sidecar(config, registry=CollectorRegistry())
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        await sidecar.stop()


@pytest.fixture
async def sidecar(canned_upstream: CannedUpstream, start_sidecar: StartSidecar) -> Sidecar:
    return await start_sidecar(canned_upstream.url, health_path="/health")


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that shows bodies exactly as sent: no decompression, no cookies kept."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


async def scrape(sidecar: Sidecar) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sidecar.admin_url}/metrics") as response,
    ):
        return await response.text()


async def scrape_until(sidecar: Sidecar, check: Callable[[str], bool]) -> str:
    """Scrape until `check` holds: payloads are recorded, rows written and gauges refreshed
    after the reply. Bounded (about 20 s): the last scrape is returned either way and the
    caller's assertions say what is missing."""
    text = ""
    for _ in range(1000):
        text = await scrape(sidecar)
        if check(text):
            break
        await asyncio.sleep(0.02)
    return text


async def settled(sidecar: Sidecar, name: str, expected: float, **labels: str) -> str:
    """Scrape until one sample reaches its expected value."""
    return await scrape_until(sidecar, lambda text: sample(text, name, **labels) == expected)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in exposition text, or None when no sample has these labels."""
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            if metric.name == name and all(metric.labels.get(k) == v for k, v in labels.items()):
                return float(metric.value)
    return None


def free_port() -> int:
    """A port with nothing listening on it, for 'upstream unreachable'."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()
