"""The proxy relays every exchange as the upstream sent it: status, headers and body bytes."""

from __future__ import annotations

import asyncio
import gzip
import io
import uuid

import aiohttp
import pytest
from yarl import URL

from sidecar.app import Sidecar
from tests.conftest import BIG, CannedUpstream, payload_bytes

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "date"}


async def fetch(
    client: aiohttp.ClientSession, method: str, url: str, **kwargs: object
) -> tuple[int, list[tuple[str, str]], bytes]:
    # encoded=True: the path goes on the wire exactly as written, %2F and all.
    async with client.request(method, URL(url, encoded=True), **kwargs) as response:  # type: ignore[arg-type]
        body = await response.read()
        headers = [
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in response.raw_headers
            if name.decode("latin-1").lower() not in HOP_BY_HOP
        ]
        return response.status, headers, body


async def direct_and_proxied(
    client: aiohttp.ClientSession,
    upstream: CannedUpstream,
    sidecar: Sidecar,
    method: str,
    path: str,
    **kwargs: object,
) -> tuple[tuple[int, list[tuple[str, str]], bytes], tuple[int, list[tuple[str, str]], bytes]]:
    direct = await fetch(client, method, upstream.url + path, **kwargs)
    proxied = await fetch(client, method, sidecar.proxy_url + path, **kwargs)
    return direct, proxied


def assert_same(
    proxied: tuple[int, list[tuple[str, str]], bytes],
    direct: tuple[int, list[tuple[str, str]], bytes],
) -> None:
    """Same status, body bytes and headers; the proxy may only add the X-Request-ID it made."""
    assert proxied[0] == direct[0]
    assert proxied[2] == direct[2]
    assert without_request_id(proxied[1]) == without_request_id(direct[1])


def without_request_id(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k != "x-request-id"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
async def test_methods_relay_byte_for_byte(client, canned_upstream, sidecar, method):
    """Each method's status, headers and body come back exactly as a direct call gets them."""
    marker = uuid.uuid4().hex.encode()
    direct, proxied = await direct_and_proxied(
        client, canned_upstream, sidecar, method, f"/echo?q={marker.decode()}&x=%2F", data=marker
    )
    assert proxied[0] == direct[0] == 200
    assert proxied[2] == direct[2] == marker
    assert without_request_id(proxied[1]) == without_request_id(direct[1])
    assert canned_upstream.seen[-1]["path_qs"] == f"/echo?q={marker.decode()}&x=%2F"


async def test_binary_body_both_ways(client, canned_upstream, sidecar):
    """Every byte value survives the trip up and back."""
    body = bytes(range(256)) * 64
    status, _, echoed = await fetch(client, "POST", sidecar.proxy_url + "/echo", data=body)
    assert status == 200
    assert echoed == body
    assert canned_upstream.seen[-1]["body"] == body


async def test_twenty_megabyte_bodies(client, canned_upstream, sidecar):
    """A 20 MB request body and a 20 MB response body pass through unchanged."""
    body = payload_bytes(BIG)
    status, _, echoed = await fetch(
        client, "POST", sidecar.proxy_url + "/echo", data=io.BytesIO(body)
    )
    assert status == 200
    assert echoed == body
    direct, proxied = await direct_and_proxied(
        client, canned_upstream, sidecar, "GET", f"/bytes/{BIG}"
    )
    assert_same(proxied, direct)


async def test_request_headers_forwarded_except_hop_by_hop(client, canned_upstream, sidecar):
    """End-to-end headers arrive in order and case; Connection and what it names do not."""
    headers = {
        "X-Custom": "Value With Spaces",
        "Authorization": "Bearer token",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
    }
    await fetch(client, "GET", sidecar.proxy_url + "/echo", headers=headers)
    seen = {name.lower(): value for name, value in canned_upstream.seen[-1]["headers"]}
    assert seen["x-custom"] == "Value With Spaces"
    assert seen["authorization"] == "Bearer token"
    for dropped in ("connection", "x-drop-me", "keep-alive", "proxy-authorization"):
        assert dropped not in seen


async def test_request_id_kept_or_generated(client, canned_upstream, sidecar):
    """A client's X-Request-ID reaches the upstream and comes back; without one, one is made."""
    async with client.get(
        sidecar.proxy_url + "/echo", headers={"X-Request-ID": "abc-123"}
    ) as response:
        assert response.headers["X-Request-ID"] == "abc-123"
    assert dict(canned_upstream.seen[-1]["headers"])["X-Request-ID"] == "abc-123"
    async with client.get(sidecar.proxy_url + "/echo") as response:
        generated = response.headers["X-Request-ID"]
    assert len(generated) == 32
    assert dict(canned_upstream.seen[-1]["headers"])["X-Request-ID"] == generated


async def test_chunked_response(client, canned_upstream, sidecar):
    """A chunked response arrives with the same body."""
    direct, proxied = await direct_and_proxied(client, canned_upstream, sidecar, "GET", "/chunked")
    assert_same(proxied, direct)
    assert proxied[2] == b"".join(f"chunk {i}\n".encode() for i in range(5))


async def test_sse_events_arrive_before_the_stream_ends(client, canned_upstream, sidecar):
    """The first server-sent event reaches the client while the upstream is still streaming."""
    async with client.get(sidecar.proxy_url + "/sse") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=10)
        assert first == b"data: first\n\n"
        assert not canned_upstream.sse_release.is_set()
        canned_upstream.sse_release.set()
        rest = await response.read()
    assert rest == b"".join(f"data: event {i}\n\n".encode() for i in range(3))


async def test_gzip_passes_undecoded(client, canned_upstream, sidecar):
    """A gzip-encoded body reaches the client still compressed, with its Content-Encoding."""
    direct, proxied = await direct_and_proxied(client, canned_upstream, sidecar, "GET", "/gzip")
    assert_same(proxied, direct)
    assert ("content-encoding", "gzip") in proxied[1]
    assert gzip.decompress(proxied[2]).startswith(b'{"compressed": true}')


@pytest.mark.parametrize("code", [204, 304])
async def test_bodiless_statuses(client, canned_upstream, sidecar, code):
    """204 and 304 come back with no body."""
    direct, proxied = await direct_and_proxied(
        client, canned_upstream, sidecar, "GET", f"/status/{code}"
    )
    assert proxied[0] == direct[0] == code
    assert proxied[2] == b""
    assert without_request_id(proxied[1]) == without_request_id(direct[1])


async def test_head_keeps_content_length(client, canned_upstream, sidecar):
    """HEAD gets the GET's headers, Content-Length included, and no body."""
    direct, proxied = await direct_and_proxied(
        client, canned_upstream, sidecar, "HEAD", "/bytes/1234"
    )
    assert_same(proxied, direct)
    assert ("content-length", "1234") in proxied[1]


async def test_nothing_added_when_upstream_sends_no_content_type(client, canned_upstream, sidecar):
    """Like TorchServe: no Content-Type from the upstream means none to the client either."""
    direct, proxied = await direct_and_proxied(
        client, canned_upstream, sidecar, "POST", "/no-content-type"
    )
    assert_same(proxied, direct)
    assert "content-type" not in {name for name, _ in proxied[1]}


async def test_upstream_error_status_is_the_upstreams(client, canned_upstream, sidecar):
    """A 500 from the model server reaches the client as the model server wrote it."""
    direct, proxied = await direct_and_proxied(client, canned_upstream, sidecar, "POST", "/error")
    assert_same(proxied, direct)
    assert proxied[0] == 500


async def test_hundred_concurrent_clients(client, canned_upstream, sidecar):
    """100 clients at once each get their own body back."""

    async def one(index: int) -> bytes:
        _, _, body = await fetch(
            client, "POST", sidecar.proxy_url + "/echo", data=f"client {index}".encode()
        )
        return body

    bodies = await asyncio.gather(*(one(i) for i in range(100)))
    assert bodies == [f"client {i}".encode() for i in range(100)]


async def test_upstream_connections_are_reused(client, canned_upstream, sidecar):
    """Sequential requests share one pooled keep-alive connection to the upstream."""
    for _ in range(20):
        await fetch(client, "POST", sidecar.proxy_url + "/echo", data=b"x")
    proxied = [seen for seen in canned_upstream.seen if seen["path_qs"] == "/echo"]
    assert len(proxied) == 20
    # One connection for the proxied requests, one for the readiness probe.
    assert len(canned_upstream.connections) <= 2


async def test_connection_closed_by_upstream_is_not_reused(client, canned_upstream, sidecar):
    """After the upstream hangs up an idle connection, the next request still goes through."""
    status, _, body = await fetch(client, "GET", sidecar.proxy_url + "/close-after")
    assert (status, body) == (200, b"bye")
    for _ in range(3):
        status, _, body = await fetch(client, "POST", sidecar.proxy_url + "/echo", data=b"again")
        assert (status, body) == (200, b"again")
