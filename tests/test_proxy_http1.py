"""The proxy port's own HTTP/1.1, spoken over raw sockets: framing, keep-alive, pipelining,
100-continue, bad input, timeouts and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar
from sidecar.config import Config
from sidecar.proxy.http1 import Http1Server, HttpConnection, Request
from tests.conftest import CannedUpstream, assert_sample, scrape, settled
from tests.raw_http import closed, connect, post, read_response
from tests.test_hardening import only_connection, until


async def test_pipelined_requests_are_answered_in_order(canned_upstream, sidecar):
    """Three requests in one write: three answers, in order, on the same connection."""
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(b"".join(post("/echo", b"request %d" % i) for i in range(3)))
    bodies = [(await read_response(reader))[2] for _ in range(3)]
    assert bodies == [b"request 0", b"request 1", b"request 2"]
    writer.write(post("/echo", b"after"))  # and the connection is still good
    assert (await read_response(reader))[2] == b"after"
    writer.close()


async def test_http10_client_gets_close_unless_it_asks_to_keep_alive(canned_upstream, sidecar):
    """HTTP/1.0 without keep-alive: answered, then closed. With it: confirmed, and kept."""
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(b"GET /echo HTTP/1.0\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status.split(b" ")[1] == b"200"
    assert (b"Connection", b"close") in headers
    assert await closed(reader)
    writer.close()

    reader, writer = await connect(sidecar.proxy_url)
    for _ in range(2):
        writer.write(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status.split(b" ")[1] == b"200"
        assert (b"Connection", b"keep-alive") in headers
    writer.close()


async def test_stream_to_http10_client_is_close_delimited(canned_upstream, sidecar):
    """An HTTP/1.0 client cannot read chunks: the stream's end is the connection's end."""
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(b"GET /chunked HTTP/1.0\r\n\r\n")
    _, headers, body = await read_response(reader)
    assert b"transfer-encoding" not in {name.lower() for name, _ in headers}
    assert body == b"".join(b"chunk %d\n" % i for i in range(5))
    writer.close()


async def test_connection_close_is_honoured(canned_upstream, sidecar):
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(post("/echo", b"bye", b"Connection: close"))
    _, headers, body = await read_response(reader)
    assert body == b"bye"
    assert (b"Connection", b"close") in headers
    assert await closed(reader)
    writer.close()


async def test_malformed_request_gets_400_and_close(canned_upstream, sidecar):
    """Like nginx: a request llhttp cannot parse is a 400, and the connection ends."""
    seen = len(canned_upstream.seen)
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(b"GET / HTTP/1.1\r\nBad Header Name: x\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert await closed(reader)
    assert len(canned_upstream.seen) == seen
    writer.close()


async def test_oversized_head_gets_431(canned_upstream, sidecar):
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert await closed(reader)
    writer.close()


async def test_expect_100_continue_is_answered_by_the_proxy(canned_upstream, sidecar):
    """The client waits for 100 Continue before its body; the upstream sees no Expect."""
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(post("/echo", b"", b"Expect: 100-continue").replace(b"Length: 0", b"Length: 5"))
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    _, _, body = await read_response(reader)
    assert body == b"hello"
    assert "expect" not in {name.lower() for name, _ in canned_upstream.seen[-1]["headers"]}
    writer.close()


async def test_chunked_request_bodies(canned_upstream, sidecar):
    """A chunked body that came whole goes upstream with a length; one still arriving streams
    through chunked."""
    reader, writer = await connect(sidecar.proxy_url)
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    writer.write(chunked + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert (await read_response(reader))[2] == b"hello world"
    upstream_headers = {name.lower(): value for name, value in canned_upstream.seen[-1]["headers"]}
    assert upstream_headers["content-length"] == "11"

    streamed = chunked.replace(b"/echo", b"/echo/streamed")
    writer.write(streamed + b"5\r\nhello\r\n")
    await canned_upstream.head_of("/echo/streamed")  # sent on before the rest has come
    writer.write(b"6\r\n world\r\n0\r\n\r\n")
    assert (await read_response(reader))[2] == b"hello world"
    upstream_headers = {name.lower(): value for name, value in canned_upstream.seen[-1]["headers"]}
    assert upstream_headers["transfer-encoding"] == "chunked"
    writer.close()


async def test_empty_request_id_gets_a_real_one(client, canned_upstream, sidecar):
    async with client.get(sidecar.proxy_url + "/echo", headers={"X-Request-ID": ""}) as response:
        assert len(response.headers.getall("X-Request-ID")[-1]) == 32


@pytest.fixture
async def raw_upstream() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An upstream that answers every request with the bytes in `answer[0]`."""
    answer: list[bytes] = [b""]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                writer.write(answer[0])
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", answer
    server.close()


async def test_upstream_header_bytes_reach_the_client_exactly(raw_upstream, start_sidecar):
    """Names in their case, values in any bytes (UTF-8 here), in order; hop-by-hop ones and
    those the upstream's Connection names are dropped; the reason phrase is the upstream's."""
    url, answer = raw_upstream
    end_to_end = [
        b"x-lower: a",
        "X-Name: café ☕".encode(),
        b"X-MIXED-Case: \xff\xfe",
        b"Content-Length: 2",
    ]
    answer[0] = b"\r\n".join(
        [
            b"HTTP/1.1 201 Made It",
            end_to_end[0],
            b"Connection: keep-alive, X-Hop",
            end_to_end[1],
            b"X-Hop: 1",
            b"Keep-Alive: timeout=5",
            *end_to_end[2:],
            b"",
            b"ok",
        ]
    )
    sidecar = await start_sidecar(url)
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Request-ID: r1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    assert head == b"\r\n".join(
        [b"HTTP/1.1 201 Made It", *end_to_end, b"X-Request-ID: r1", b"", b""]
    )
    assert await reader.readexactly(2) == b"ok"
    writer.close()


async def test_informational_replies_from_the_upstream_are_skipped(raw_upstream, start_sidecar):
    """A 103 Early Hints before the answer: the client gets the answer, the hints' headers do
    not leak into it."""
    url, answer = raw_upstream
    answer[0] = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Final: 1\r\n\r\nbody"
    )
    sidecar = await start_sidecar(url)
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert (status, body) == (b"HTTP/1.1 200 OK", b"body")
    assert [name for name, _ in headers] == [b"Content-Length", b"X-Final", b"X-Request-ID"]
    writer.close()


StartClosing = Callable[..., Awaitable[str]]


@pytest.fixture
async def closing_upstream() -> AsyncIterator[StartClosing]:
    """Start upstreams that answer each request with fixed bytes, then close the connection
    (with a reset if asked): one connection per request, like an HTTP/1.0 server."""
    servers: list[asyncio.Server] = []

    async def start(answer: bytes, *, reset: bool = False) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":")[1]))
            writer.write(answer)
            await writer.drain()
            if reset:  # linger 0: close() sends RST instead of FIN
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


PREDICT = post("/v1/models/iris:predict", b'{"instances": [[1, 2]]}')
PREDICTION = b'{"predictions":[1]}'


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close",
        # Chunked is not the last coding: the body still runs to the close (RFC 9112 6.3).
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: identity",
    ],
    ids=["http10", "connection-close", "not-chunked"],
)
async def test_close_delimited_reply_is_relayed_whole(closing_upstream, start_sidecar, head):
    """A reply with neither length nor chunks ends where the upstream closes: the client gets it
    whole and properly ended (chunked, or close-delimited to HTTP/1.0), its connection stays
    usable, and the exchange is a success whose body the payload metrics read."""
    url = await closing_upstream(head + b"\r\n\r\n" + PREDICTION)
    sidecar = await start_sidecar(url, preset="kserve-v1")
    reader, writer = await connect(sidecar.proxy_url)
    for _ in range(2):  # the second on the same client connection, a new upstream one
        writer.write(PREDICT)
        status, headers, body = await read_response(reader)
        assert (status, body) == (b"HTTP/1.1 200 OK", PREDICTION)
        assert (b"Transfer-Encoding", b"chunked") in headers
    writer.close()

    reader, writer = await connect(sidecar.proxy_url)
    writer.write(PREDICT.replace(b"HTTP/1.1", b"HTTP/1.0"))
    _, headers, body = await read_response(reader)  # to EOF
    assert body == PREDICTION
    assert (b"Connection", b"close") in headers
    writer.close()

    text = await settled(sidecar, "ml_predictions_total", 3)
    assert_sample(text, "ml_requests_total", 3, code="200")
    assert_sample(text, "ml_errors_total", None)


@pytest.mark.parametrize(
    ("answer", "reset"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\nshort", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", False),
        (b"HTTP/1.0 200 OK\r\n\r\n" + PREDICTION, True),
    ],
    ids=["length-then-close", "chunks-then-close", "no-length-then-reset"],
)
async def test_reply_cut_short_is_an_upstream_reset(closing_upstream, start_sidecar, answer, reset):
    """A close before the length or the last chunk, or a reset, cuts the reply: the client's
    body ends unfinished and the exchange counts as upstream_reset."""
    sidecar = await start_sidecar(await closing_upstream(answer, reset=reset))
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(PREDICT)
    with pytest.raises(asyncio.IncompleteReadError):
        await read_response(reader)
    writer.close()
    text = await settled(sidecar, "ml_errors_total", 1, error_type="upstream_reset")
    assert_sample(text, "ml_requests_total", 1, code="200")


async def test_upstream_silent_mid_stream_times_out(canned_upstream, start_sidecar):
    """No bytes for upstream_timeout in the middle of a stream: the client's stream is cut and
    the upstream request dropped, counted as upstream_timeout."""
    sidecar = await start_sidecar(canned_upstream.url, upstream_timeout=0.3)
    async with (
        aiohttp.ClientSession() as session,
        session.get(sidecar.proxy_url + "/sse-forever") as response,
    ):
        assert await response.content.readuntil(b"\n\n") == b"data: first\n\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await asyncio.wait_for(canned_upstream.stream_abandoned.wait(), timeout=10)
    assert_sample(await scrape(sidecar), "ml_errors_total", 1, error_type="upstream_timeout")


async def test_stop_closes_idle_keep_alive_connections(canned_upstream: CannedUpstream):
    """Draining does not wait for idle keep-alive connections: they are closed at once (well
    before the drain timeout, which closed() would not wait out)."""
    config = Config(
        upstream=canned_upstream.url,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        drain_timeout=60,
        shutdown_delay=0,  # no load balancer to wait for
    )
    sidecar = Sidecar(config, registry=CollectorRegistry())
    await sidecar.start()
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(post("/echo", b"x"))
    await read_response(reader)
    stopping = asyncio.ensure_future(sidecar.stop())
    try:
        assert await closed(reader)
    finally:
        await stopping
    writer.close()


async def test_stop_lets_a_stream_in_progress_finish_then_closes(canned_upstream: CannedUpstream):
    """A reply already under way when draining starts goes out whole, then the connection
    closes although it was keep-alive."""
    config = Config(
        upstream=canned_upstream.url, host="127.0.0.1", port=0, metrics_port=0, shutdown_delay=0
    )
    sidecar = Sidecar(config, registry=CollectorRegistry())
    await sidecar.start()
    reader, writer = await connect(sidecar.proxy_url)
    writer.write(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"data: first\n\n\r\n"), timeout=10)
    connection = only_connection(sidecar)
    stopping = asyncio.ensure_future(sidecar.stop())
    await until(lambda: connection.draining)
    canned_upstream.sse_release.set()
    rest = await asyncio.wait_for(reader.read(), timeout=10)  # to EOF
    await stopping
    assert rest.endswith(b"data: event 2\n\n\r\n0\r\n\r\n")
    writer.close()


async def test_client_hanging_up_before_the_answer_is_a_499(canned_upstream, sidecar):
    """The upstream request goes when the client does; the exchange is a 499."""
    _, writer = await connect(sidecar.proxy_url)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(canned_upstream.slow_started.wait(), timeout=10)
    writer.close()
    text = await settled(sidecar, "ml_errors_total", 1, error_type="client_disconnect")
    assert_sample(text, "ml_requests_total", 1, code="499")
    assert_sample(text, "ml_requests_in_progress", 0)


async def test_client_leaving_mid_upload_is_a_client_disconnect(canned_upstream, sidecar):
    """A large body streams to the upstream as it comes; if the client stops halfway, the
    exchange is the client's failure, not a 502 from the upstream."""
    _, writer = await connect(sidecar.proxy_url)
    writer.write(post("/echo", b"")[:-2].replace(b"Length: 0", b"Length: 10000000") + b"\r\n")
    writer.write(b"x" * 200_000)
    await writer.drain()
    await canned_upstream.head_of("/echo")  # the upload is under way upstream
    writer.close()
    text = await settled(sidecar, "ml_requests_in_progress", 0)
    assert_sample(text, "ml_errors_total", 1, error_type="client_disconnect")
    assert_sample(text, "ml_requests_total", None, code="502")


# The server on its own, with small handlers.


async def hello(request: Request, connection: HttpConnection) -> None:
    body = b"hello " + request.path.encode()
    headers = [(b"Content-Length", b"%d" % len(body))]
    connection.send_head(200, b"OK", headers, len(body), body, end=True)


@contextlib.asynccontextmanager
async def serving(handler: Any = hello, **settings: Any) -> AsyncIterator[Http1Server]:
    """An Http1Server on an ephemeral port, stopped on the way out."""
    server = Http1Server(handler, whole_body_limit=1024, **settings)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop(1.0)


async def test_idle_connections_close_after_the_keepalive_timeout():
    async with serving(keepalive_timeout=0.2) as server:
        host, port = server.address
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[2] == b"hello /a"
        assert await closed(reader)
        writer.close()


async def test_a_reply_the_client_never_reads_does_not_hold_the_connection():
    """A whole reply written at once and never read: after send_timeout the connection is cut,
    where closing it would wait for ever for the client to take the rest."""
    body = b"x" * 20_000_000

    async def large(request: Request, connection: HttpConnection) -> None:
        headers = [(b"Content-Length", b"%d" % len(body))]
        connection.send_head(200, b"OK", headers, len(body), body, end=True)

    async with serving(large, keepalive_timeout=0.1, send_timeout=0.2) as server:
        _, writer = await asyncio.open_connection(*server.address, limit=1024)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(500):
            if not server.connections:
                break
            await asyncio.sleep(0.02)
        assert not server.connections
        writer.close()


async def broken(request: Request, connection: HttpConnection) -> None:
    raise RuntimeError("bug")


def broken_in_callback(request: Request, connection: HttpConnection) -> None:
    raise RuntimeError("bug")


@pytest.mark.parametrize("handler", [broken, broken_in_callback], ids=["task", "callback"])
async def test_a_failing_handler_is_a_500_and_a_closed_connection(handler):
    async with serving(handler) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == b"HTTP/1.1 500 Internal Server Error"
        assert await closed(reader)
        writer.close()


def answer_at_once(request: Request, connection: HttpConnection) -> None:
    """A handler that answers from the protocol callback, without a task."""
    body = b"now " + request.path.encode()
    connection.send_head(
        200, b"OK", [(b"Content-Length", b"%d" % len(body))], len(body), body, True
    )
    connection.finished()


async def test_pipelined_requests_answered_from_callbacks_arrive_in_order():
    """Whole replies wait for the end of the loop's turn (proxy/outbox.py): those of requests
    that came in one read still go out in order, and a close after the last one waits for it."""
    async with serving(answer_at_once) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        bodies = [(await read_response(reader))[2] for _ in range(3)]
        assert bodies == [b"now /1", b"now /2", b"now /3"]
        assert await closed(reader)
        writer.close()


async def test_a_handler_answering_later_from_a_callback_hears_the_client_leave():
    """on_hang_up: a request taken on from callbacks, whose client leaves before the answer."""
    left = asyncio.Event()

    def answer_later(request: Request, connection: HttpConnection) -> None:
        connection.on_hang_up(left.set)

    async with serving(answer_later) as server:
        _, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        writer.close()
        await asyncio.wait_for(left.wait(), timeout=10)
        for _ in range(500):
            if not server.connections:
                break
            await asyncio.sleep(0.01)
        assert not server.connections


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT here")
async def test_reuse_port_lets_servers_share_a_port():
    """What `--workers N` builds on: several processes listening on one port. Off by default."""
    first, second, third = (Http1Server(hello, whole_body_limit=1024) for _ in range(3))
    try:
        await first.start("127.0.0.1", 0, reuse_port=True)
        await second.start(*first.address, reuse_port=True)
        assert second.address == first.address
        with pytest.raises(OSError, match="in use"):
            await third.start(*first.address)
    finally:
        for server in (first, second, third):
            await server.stop(1.0)


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/v2/models/iris/infer?x=1", "/v2/models/iris/infer"),
        (b"/a%20b/caf%C3%A9", "/a b/café"),
        (b"http://example.com/abs?q", "/abs"),
        (b"*", "*"),
    ],
)
def test_request_path_is_decoded_without_query(target, path):
    """The route table sees the decoded path (as aiohttp's request.path was); the upstream gets
    the target as sent."""
    request = Request("GET", target, [], True, True)
    assert request.path == path
    assert request.target == target
