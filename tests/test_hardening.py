"""A hostile client and a flaky upstream, on raw sockets: framing that could smuggle a request,
requests sent twice, requests dropped on SIGTERM, early answers lost, bodies that stop coming,
and bytes changed on the way. Each case failed before the fix it covers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sidecar.app import Sidecar
from sidecar.proxy.http1 import HttpConnection
from tests.conftest import CannedUpstream, StartSidecar, assert_sample, settled
from tests.raw_http import RawUpstream, Serve, closed, connect, post, read_head, read_response

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def forwarded(upstream: CannedUpstream, path: str) -> list[dict[str, Any]]:
    """What the canned upstream received for `path` (the readiness probe's are left out)."""
    return [request for request in upstream.seen if request["path_qs"] == path]


class HeadRecorder:
    """A raw upstream script: keeps each request head exactly as it came, answers `ok`."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                head = await read_head(reader)
            except asyncio.IncompleteReadError:
                return
            self.heads.append(head)
            writer.write(OK)
            await writer.drain()


def answering(reply: bytes) -> Serve:
    """A raw upstream script: read a request's head, send `reply`, close."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(reply)
        await writer.drain()

    return serve


# Framing: what is forwarded is framed as it was read, or refused.


@pytest.mark.parametrize("connection", [b"Content-Length", b"keep-alive, content-length", b"Host"])
async def test_connection_naming_the_length_or_host_is_refused(
    canned_upstream, sidecar, connection
):
    """Dropping what Connection names would forward the body without its length, which the
    upstream reads as a second request (or a request with no Host): 400, nothing forwarded."""
    reader, writer = await connect(sidecar.proxy_url)
    smuggled = b"GET /admin-only HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(post("/echo", smuggled, b"Connection: " + connection))
    status, _, _ = await read_response(reader)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert await closed(reader)
    assert forwarded(canned_upstream, "/echo") == forwarded(canned_upstream, "/admin-only") == []
    writer.close()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
        b"GET /echo HTTP/1.1\r\n\r\n",
    ],
    ids=["two-hosts", "same-host-twice", "no-host"],
)
async def test_a_request_without_exactly_one_host_is_refused(start_sidecar, head):
    """RFC 9112 section 3.2: which Host would the upstream route by? 400, nothing forwarded
    (a raw upstream: aiohttp's own server would refuse two Hosts itself)."""
    recorder = HeadRecorder()
    async with RawUpstream(recorder) as upstream:
        sidecar = await start_sidecar(upstream.url)
        reader, writer = await connect(sidecar.proxy_url)
        writer.write(head)
        status, _, _ = await read_response(reader)
        assert status == b"HTTP/1.1 400 Bad Request"
        assert [head for head in recorder.heads if head.startswith(b"GET /echo")] == []
        writer.close()


async def test_a_request_in_a_coding_under_the_chunks_is_a_501(canned_upstream, sidecar):
    """gzip under chunked: relayed, the chunks would come off and the gzip go unsaid."""
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    status, _, _ = await read_response(reader)
    assert status == b"HTTP/1.1 501 Not Implemented"
    assert forwarded(canned_upstream, "/echo") == []
    writer.close()


async def test_connection_naming_the_request_id_gets_the_proxys_own(canned_upstream, sidecar):
    """The client's id is hop-by-hop then: the upstream and the client get the proxy's id."""
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(post("/echo", b"x", b"X-Request-ID: client-id", b"Connection: X-Request-ID"))
    _, headers, _ = await read_response(reader)
    [seen] = forwarded(canned_upstream, "/echo")
    ids = [value for name, value in seen["headers"] if name.lower() == "x-request-id"]
    assert len(ids) == 1
    assert ids[0] != "client-id"
    assert (b"X-Request-ID", ids[0].encode()) in headers
    writer.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: Content-Length\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["connection-names-length", "gzip-under-chunks"],
)
async def test_a_reply_framed_two_ways_is_a_502(start_sidecar: StartSidecar, reply):
    """Relayed, the first would reach the client without its length (the client hangs), the
    second without its gzip: the client gets 502, counted as upstream_invalid."""

    async with RawUpstream(answering(reply)) as upstream:
        sidecar = await start_sidecar(upstream.url)
        reader, writer = await connect(sidecar.proxy_url)
        writer.write(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == b"HTTP/1.1 502 Bad Gateway"
        assert json.loads(body)["error"] == "upstream sent an invalid response"
        writer.close()
        await settled(sidecar, "ml_errors_total", 1, error_type="upstream_invalid")


# SIGTERM: whatever the client has sent is answered.


def only_connection(sidecar: Sidecar) -> HttpConnection:
    server = sidecar._proxy_server
    assert server is not None
    [connection] = server.connections
    return connection


async def until(check: Any) -> None:
    """Wait (bounded) for a condition on the proxy's side of a connection to hold."""
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the proxy never got there")


@pytest.mark.parametrize("cut", [20, 70], ids=["head-partly-here", "body-partly-here"])
async def test_stop_answers_a_request_partly_received(canned_upstream, start_sidecar, cut):
    """A request whose head or (small) body is still arriving when draining starts is read to
    its end and answered, with Connection: close; then the connection closes."""
    sidecar = await start_sidecar(canned_upstream.url, drain_timeout=30)
    reader, writer = await connect(sidecar.proxy_url)
    request = post("/echo", b"partly here at the signal")
    writer.write(request[:cut])
    connection = only_connection(sidecar)
    await until(lambda: connection._more_behind())
    stopping = asyncio.ensure_future(sidecar.stop())
    await until(lambda: connection.draining)
    writer.write(request[cut:])
    _, headers, body = await read_response(reader)
    assert body == b"partly here at the signal"
    assert (b"Connection", b"close") in headers
    assert await closed(reader)
    await stopping
    writer.close()


async def test_stop_answers_requests_pipelined_behind_the_one_in_progress(
    canned_upstream, start_sidecar
):
    """Requests pipelined behind a long one are answered after it; the last says close."""
    sidecar = await start_sidecar(canned_upstream.url, drain_timeout=30)
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(
        b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n" + post("/echo", b"a") + post("/echo", b"b")
    )
    await asyncio.wait_for(reader.readuntil(b"data: first\n\n\r\n"), timeout=10)
    stopping = asyncio.ensure_future(sidecar.stop())
    connection = only_connection(sidecar)
    await until(lambda: connection.draining)
    canned_upstream.sse_release.set()
    await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), timeout=10)  # the stream's end
    _, first_headers, first = await read_response(reader)
    _, last_headers, last = await read_response(reader)
    assert (first, last) == (b"a", b"b")
    assert (b"Connection", b"close") not in first_headers
    assert (b"Connection", b"close") in last_headers
    assert await closed(reader)
    await stopping
    writer.close()


# Early answers, slow bodies.


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!",
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nearly ok",
    ],
    ids=["413-and-close", "200"],
)
async def test_an_early_answer_to_an_upload_reaches_the_client(start_sidecar, answer):
    """An upstream that answers before it has read a large upload, and closes: the client gets
    that answer (as nginx relays it), not a 502."""

    async with RawUpstream(answering(answer)) as upstream:
        sidecar = await start_sidecar(upstream.url)
        reader, writer = await connect(sidecar.proxy_url)
        size = 4 * 1024 * 1024
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * (256 * 1024))  # the rest is never needed
        status, _, body = await read_response(reader)
        assert (status, body) == (answer.split(b"\r\n", 1)[0], answer[-8:])
        assert await closed(reader)
        writer.close()


@pytest.mark.parametrize("length", [100, 4 * 1024 * 1024], ids=["read-whole", "streamed"])
async def test_a_body_that_stops_coming_gets_408(canned_upstream, start_sidecar, length):
    """client_body_timeout: no body byte for that long is a 408, and the upstream request (for
    a body streamed to it) is dropped."""
    sidecar = await start_sidecar(canned_upstream.url, client_body_timeout=0.2)
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nabc" % length)
    status, _, _ = await read_response(reader)
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert await closed(reader)
    assert forwarded(canned_upstream, "/echo") == []
    writer.close()
    if length > 100:  # it had reached the upstream: an exchange, counted
        text = await settled(sidecar, "ml_errors_total", 1, error_type="client_body_timeout")
        assert_sample(text, "ml_requests_total", 1, code="408")


# Bytes pass unchanged.


async def test_bytes_over_0x7f_in_the_target_are_forwarded_as_they_came(start_sidecar):
    """A UTF-8 path (and any byte in the query) reaches the upstream as sent, as with nginx."""
    recorder = HeadRecorder()
    async with RawUpstream(recorder) as upstream:
        sidecar = await start_sidecar(upstream.url)
        reader, writer = await connect(sidecar.proxy_url)
        writer.write(b"GET /caf\xc3\xa9/\xe2\x9c\x93?q=\xff HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == b"HTTP/1.1 200 OK"
        assert recorder.heads[-1].startswith(b"GET /caf\xc3\xa9/\xe2\x9c\x93?q=\xff HTTP/1.1\r\n")
        writer.close()


async def test_a_request_id_of_any_bytes_goes_both_ways_unchanged(start_sidecar):
    """The client's X-Request-ID reaches the upstream, and comes back, byte for byte."""
    recorder = HeadRecorder()
    async with RawUpstream(recorder) as upstream:
        sidecar = await start_sidecar(upstream.url)
        reader, writer = await connect(sidecar.proxy_url)
        writer.write(b"GET /p HTTP/1.1\r\nHost: x\r\nX-Request-ID: \xff\xfe\r\n\r\n")
        _, headers, _ = await read_response(reader)
        assert b"\r\nX-Request-ID: \xff\xfe\r\n" in recorder.heads[-1]
        assert (b"X-Request-ID", b"\xff\xfe") in headers
        writer.close()
