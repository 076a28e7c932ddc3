"""Request smuggling against a real nginx upstream over pooled connections: what one client
sends must never be read by the upstream as a request of its own, nor answered to another."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.conftest import StartSidecar
from tests.nginx import nginx_echoing_targets
from tests.raw_http import connect, post, read_response


@pytest.fixture
def nginx() -> Iterator[str]:
    with nginx_echoing_targets() as url:
        yield url


async def victim(url: str, target: bytes) -> bytes:
    """An innocent client's request on a fresh connection; the body of its answer."""
    reader, writer = await connect(url)
    writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer victim\r\n\r\n" % target)
    _, _, body = await read_response(reader)
    writer.close()
    return body


async def test_a_body_named_hop_by_hop_cannot_smuggle_a_request(
    nginx: str, start_sidecar: StartSidecar
):
    """`Connection: Content-Length` once made the proxy forward the body without its length:
    nginx read the body as a second request, and its answer went to the next client on the
    pooled connection. Now the attack is a 400, and every client gets its own answer."""
    sidecar = await start_sidecar(nginx)
    assert await victim(sidecar.proxy_url, b"/warm") == b"GET /warm\n"  # a pooled connection
    smuggled = b"GET /admin-only HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(5):
        reader, writer = await connect(sidecar.proxy_url)
        writer.write(post("/a", smuggled, b"Connection: Content-Length"))
        status, _, _ = await read_response(reader)
        writer.close()
        assert status == b"HTTP/1.1 400 Bad Request"
        answers = await asyncio.gather(*(victim(sidecar.proxy_url, b"/v%d" % i) for i in range(4)))
        assert answers == [b"GET /v%d\n" % i for i in range(4)]
