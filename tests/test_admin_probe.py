"""The readiness probe behind /readyz, against scripted upstreams: what it counts as an answer
(redirects followed on the same host, as aiohttp's client did), its timeout, and its connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry, Gauge

from sidecar.readiness import HttpCheck, HttpReadiness, UpstreamProbe
from tests.raw_http import RawUpstream, read_head

Script = Callable[[bytes], bytes | None]  # a request's head -> the raw answer (None: stay silent)


def answer(status: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    lines = [b"HTTP/1.1 " + status, *headers, b"Content-Length: %d" % len(body), b"", body]
    return b"\r\n".join(lines)


class Upstream:
    """Answers each request on a connection with `script`; counts connections and requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.targets: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while not reader.at_eof():
            try:
                head = await read_head(reader)
            except asyncio.IncompleteReadError:
                return
            self.targets.append(head.split(b" ", 2)[1])
            reply = self.script(head)
            if reply is None:
                await reader.read()  # silent until the probe gives up and closes
                return
            writer.write(reply)
            await writer.drain()


@asynccontextmanager
async def probe_of(
    script: Script, path: str = "/health", interval: float = 30.0
) -> AsyncIterator[tuple[UpstreamProbe, Upstream, str]]:
    """A started probe (its first answer in) of an upstream answering with `script`."""
    upstream = Upstream(script)
    async with RawUpstream(upstream.serve) as raw:
        up = Gauge("up", "", registry=CollectorRegistry())
        probe = UpstreamProbe(HttpReadiness(HttpCheck(raw.url + path)), interval=interval, up=up)
        await probe.start()
        try:
            yield probe, upstream, raw.url
        finally:
            await probe.stop()


async def test_a_redirect_on_the_same_host_is_followed() -> None:
    """/health says 307 to /health/ready, which says 200: ready, on the health URL's word."""

    def script(head: bytes) -> bytes:
        if head.startswith(b"GET /health "):
            return answer(b"307 Temporary Redirect", b"Location: /health/ready")
        return answer(b"200 OK", body=b"ok")

    async with probe_of(script) as (probe, upstream, url):
        assert probe.status == (True, f"{url}/health answered 200")
        assert upstream.targets == [b"/health", b"/health/ready"]


async def test_a_redirect_to_another_host_is_the_answer() -> None:
    """A redirect elsewhere is not followed: its 302 is the answer, and 302 is not ready."""

    def script(head: bytes) -> bytes:
        return answer(b"302 Found", b"Location: http://elsewhere.invalid/health")

    async with probe_of(script) as (probe, upstream, url):
        assert probe.status == (False, f"{url}/health answered 302")
        assert upstream.targets == [b"/health"]


async def test_a_silent_health_path_is_unreachable_after_the_timeout() -> None:
    """The probe waits at most min(interval, 5 s) for the whole answer, then gives up."""
    started = time.monotonic()
    async with probe_of(lambda head: None, interval=0.3) as (probe, _, url):
        assert time.monotonic() - started < 2.0
        assert probe.status == (False, f"{url}/health unreachable: TimeoutError")


async def test_an_unparseable_answer_is_unreachable() -> None:
    """Bytes that are not HTTP make the upstream unreachable, with the parser's reason."""
    async with probe_of(lambda head: b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as (probe, _, url):
        ready, reason = probe.status
        assert not ready
        assert reason.startswith(f"{url}/health unreachable: UpstreamInvalid")


async def test_probes_reuse_their_connection() -> None:
    """Probes close together share one keep-alive connection, as aiohttp's pool did."""
    async with probe_of(lambda head: answer(b"200 OK", body=b"ok")) as (probe, upstream, _):
        for _ in range(3):
            await probe.probe()
        assert (len(upstream.targets), upstream.connections) == (4, 1)
