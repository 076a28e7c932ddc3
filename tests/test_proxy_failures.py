"""When the upstream fails, the client hears it from the proxy, and the metrics say why."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import pytest

from sidecar.app import Sidecar
from tests.conftest import BIG, CannedUpstream, assert_sample, scrape, settled


async def test_upstream_down_gives_502_json(client, start_sidecar, refusing_url):
    """Connection refused: 502 with a short JSON reason, counted as upstream_unreachable."""
    sidecar = await start_sidecar(refusing_url)
    async with client.post(sidecar.proxy_url + "/predict", data=b"{}") as response:
        assert response.status == 502
        assert response.headers["Content-Type"].startswith("application/json")
        body = await response.json()
        assert body["error"] == "upstream unreachable"
        assert body["request_id"] == response.headers["X-Request-ID"]
    text = await scrape(sidecar)
    assert_sample(text, "ml_errors_total", 1, error_type="upstream_unreachable")
    assert_sample(text, "ml_requests_total", 1, code="502", method="POST")


@pytest.mark.parametrize(
    ("path", "code", "error_type"),
    [("/error", "500", "upstream_5xx"), ("/status/503", "503", "upstream_5xx"),
     ("/status/404", "404", "client_4xx"), ("/status/429", "429", "client_4xx")],
)  # fmt: skip
async def test_the_model_servers_error_answers_are_relayed_and_counted(
    client, canned_upstream, sidecar, path, code, error_type
):
    """A 5xx or 4xx from the model server reaches the client as it came, and counts once as the
    model server's failure (upstream_5xx, which the availability SLO counts) or the client's
    (client_4xx, which it does not)."""
    async with client.get(sidecar.proxy_url + path) as response:
        assert response.status == int(code)
        forwarded = await response.read()
    assert forwarded == (b"Internal Server Error" if path == "/error" else b"")
    text = await settled(sidecar, "ml_requests_total", 1, code=code)
    assert_sample(text, "ml_errors_total", 1, error_type=error_type)
    other = "client_4xx" if error_type == "upstream_5xx" else "upstream_5xx"
    assert_sample(text, "ml_errors_total", None, error_type=other)


# A request that finds an idle pooled connection is answered from callbacks, without a task
# (proxy/server.py); one that does not, by a coroutine. `pooled` runs a failure both ways.
POOLED = pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "pooled"])


async def warm(client: aiohttp.ClientSession, sidecar: Sidecar, upstream: CannedUpstream) -> None:
    """One request, so that the next finds an idle upstream connection."""
    async with client.post(sidecar.proxy_url + "/echo", data=b"warm") as response:
        assert await response.read() == b"warm"
    assert upstream.connections


@POOLED
async def test_slow_upstream_gives_504(client, canned_upstream, start_sidecar, pooled):
    """No answer within upstream_timeout: 504, counted as upstream_timeout."""
    sidecar = await start_sidecar(canned_upstream.url, upstream_timeout=0.3)
    if pooled:
        await warm(client, sidecar, canned_upstream)
    opened = len(canned_upstream.connections)
    async with client.get(sidecar.proxy_url + "/slow") as response:
        assert response.status == 504
        assert (await response.json())["error"] == "upstream timed out"
    if pooled:
        assert len(canned_upstream.connections) == opened  # it went out on the pooled one
    text = await scrape(sidecar)
    assert_sample(text, "ml_errors_total", 1, error_type="upstream_timeout")
    # The timed-out connection is not reused: a late reply must not answer the next request.
    async with client.post(sidecar.proxy_url + "/echo", data=b"next") as response:
        assert await response.read() == b"next"


@POOLED
async def test_reset_mid_body_closes_client_connection(client, canned_upstream, sidecar, pooled):
    """An upstream that dies mid-body: the client's connection closes early too, and it counts."""
    if pooled:
        await warm(client, sidecar, canned_upstream)
    async with client.get(sidecar.proxy_url + "/reset") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    text = await scrape(sidecar)
    assert_sample(text, "ml_errors_total", 1, error_type="upstream_reset")


async def test_proxy_keeps_serving_after_failures(client, canned_upstream, sidecar):
    """A reset or timeout on one request leaves the next one untouched."""
    async with client.get(sidecar.proxy_url + "/reset") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    async with client.post(sidecar.proxy_url + "/echo", data=b"after") as response:
        assert await response.read() == b"after"


async def test_client_hanging_up_mid_stream_cancels_upstream(canned_upstream, sidecar):
    """A client that leaves a stream early: the proxy drops the upstream request at once."""
    async with aiohttp.ClientSession() as session:
        response = await session.get(sidecar.proxy_url + "/sse-forever")
        assert await response.content.readuntil(b"\n\n") == b"data: first\n\n"
        response.close()  # hang up without reading the rest
    await asyncio.wait_for(canned_upstream.stream_abandoned.wait(), timeout=10)
    text = await settled(sidecar, "ml_errors_total", 1, error_type="client_disconnect")
    assert_sample(text, "ml_requests_in_progress", 0)


async def test_client_that_stops_reading_is_cut_off_after_the_send_timeout(
    canned_upstream, start_sidecar
):
    """A client that takes no reply bytes for client_send_timeout: its connection is cut and
    the upstream request dropped, as if it had hung up, instead of waiting for it for ever."""
    sidecar = await start_sidecar(canned_upstream.url, client_send_timeout=0.2)
    host, port = sidecar.proxy_url.removeprefix("http://").rsplit(":", 1)
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        # Set before connecting, so that the window it advertises is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % BIG)
        text = await settled(sidecar, "ml_errors_total", 1, error_type="client_disconnect")
        assert_sample(text, "ml_requests_in_progress", 0)
        received = 0
        with contextlib.suppress(ConnectionResetError):  # what was queued, then EOF (or RST)
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), timeout=10):
                received += len(chunk)
    assert received < BIG


@POOLED
async def test_a_request_waiting_for_the_upstream_is_in_progress(
    client, canned_upstream, sidecar, pooled
):
    """It counts as in progress; when the client leaves before the reply, the upstream request
    is dropped at once, the exchange counted once, and nothing stays in progress."""
    if pooled:
        await warm(client, sidecar, canned_upstream)
    async with aiohttp.ClientSession() as session:
        waiting = asyncio.ensure_future(session.get(sidecar.proxy_url + "/slow"))
        await asyncio.wait_for(canned_upstream.slow_started.wait(), timeout=10)
        assert_sample(await scrape(sidecar), "ml_requests_in_progress", 1)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
    await asyncio.wait_for(canned_upstream.slow_abandoned.wait(), timeout=3)
    text = await settled(sidecar, "ml_requests_in_progress", 0)
    assert_sample(text, "ml_errors_total", 1, error_type="client_disconnect")


class ForgetfulUpstream:
    """Answers the first request on each connection (keep-alive), then meets the next one on it
    with `second`: nothing (a close, as when the upstream dropped an idle connection just as
    the request went out) or the start of an answer before the close. `connections` counts
    those that carried a request for /p (the readiness probe opens its own), `requests` the
    requests for /p it read."""

    def __init__(self, second: bytes) -> None:
        self.second = second
        self.connections = 0
        self.requests = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ForgetfulUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False
        for answer in (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", self.second):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break  # closed by the proxy
            if b" /p " in head.split(b"\r\n", 1)[0]:
                self.requests += 1
                if not counted:
                    self.connections += 1
                    counted = True
            length = next(
                (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length:")),
                0,
            )  # fmt: skip
            await reader.readexactly(length)
            writer.write(answer)
            await writer.drain()
        writer.close()


async def test_an_idempotent_request_closed_unanswered_is_retried_on_a_fresh_one(
    client, start_sidecar
):
    """A GET whose pooled connection closes before any reply byte is sent again on a new
    connection (sending it twice does no harm), and the client never hears of it."""
    async with ForgetfulUpstream(second=b"") as upstream:
        sidecar = await start_sidecar(upstream.url)
        for _ in range(3):
            async with client.get(sidecar.proxy_url + "/p") as response:
                assert (response.status, await response.read()) == (200, b"ok")
        # Each request after the first met a pooled connection's close, and was retried on a
        # new connection, which the next request then found pooled.
        assert upstream.requests == 5
        text = await scrape(sidecar)
        assert_sample(text, "ml_requests_total", 3, code="200")
        assert_sample(text, "ml_errors_total", None, error_type="upstream_reset")


async def test_a_post_closed_unanswered_is_not_sent_again(client, start_sidecar):
    """A POST that reached the upstream, which closed without answering, may have been acted
    on: the client gets 502 and the upstream saw it once (RFC 9110 section 9.2.2)."""
    async with ForgetfulUpstream(second=b"") as upstream:
        sidecar = await start_sidecar(upstream.url)
        async with client.post(sidecar.proxy_url + "/p", data=b"{}") as response:
            assert (response.status, await response.read()) == (200, b"ok")
        async with client.post(sidecar.proxy_url + "/p", data=b"{}") as response:
            assert response.status == 502
            assert (await response.json())["error"] == "upstream closed the connection"
        assert upstream.requests == 2
        text = await scrape(sidecar)
        assert_sample(text, "ml_errors_total", 1, error_type="upstream_reset")


async def test_a_pooled_connection_closed_mid_answer_is_not_retried(client, start_sidecar):
    """Some of the reply came: the upstream may have acted on the request, so no retry."""
    async with ForgetfulUpstream(second=b"HTTP/1.1 200 OK\r\nContent-Le") as upstream:
        sidecar = await start_sidecar(upstream.url)
        async with client.post(sidecar.proxy_url + "/p", data=b"{}") as response:
            assert await response.read() == b"ok"
        async with client.post(sidecar.proxy_url + "/p", data=b"{}") as response:
            assert response.status == 502
            assert (await response.json())["error"] == "upstream closed the connection"
        assert upstream.connections == 1
        text = await scrape(sidecar)
        assert_sample(text, "ml_errors_total", 1, error_type="upstream_reset")
