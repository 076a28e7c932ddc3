"""The admin port's HTTP contract on a real AdminServer (port 0): routing, HEAD, content types,
gzip, /readyz, and /feedback's token and body limits, read as raw bytes where framing matters."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator, Sequence
from typing import cast

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder

from sidecar import admin
from sidecar.admin import AdminServer, make_admin_app
from sidecar.app import url_of
from sidecar.feedback.recorder import FeedbackItem, FeedbackRecorder
from tests.raw_http import closed, connect, post, read_response

TOKEN = "s3cret"
AUTHORIZED = b"Authorization: Bearer " + TOKEN.encode()


class FakeFeedback:
    """What /feedback asks of a FeedbackRecorder: its token, and apply()."""

    token = TOKEN

    def __init__(self) -> None:
        self.applied: list[FeedbackItem] = []

    async def apply(self, items: Sequence[FeedbackItem]) -> dict[str, int]:
        self.applied.extend(items)
        return {"matched": 0, "unmatched": len(items)}


class Admin:
    """An admin port with a settable readiness answer and a fake feedback recorder."""

    def __init__(self) -> None:
        self.readiness: tuple[bool, str] = (True, "all good")
        self.feedback = FakeFeedback()
        self.registry = CollectorRegistry()
        Counter("things", "Things counted.", registry=self.registry).inc(3)
        app = make_admin_app(
            self.registry,
            lambda: self.readiness,
            feedback=cast(FeedbackRecorder, self.feedback),
        )
        self.server = AdminServer(app)
        self.url = ""


@pytest.fixture
async def admin_port() -> AsyncIterator[Admin]:
    port = Admin()
    await port.server.start("127.0.0.1", 0)
    port.url = url_of(port.server.address)
    yield port
    await port.server.stop()


async def exchange(url: str, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send one raw request on a new connection; (status, headers by lower-case name, body)."""
    reader, writer = await connect(url)
    try:
        writer.write(request)
        status_line, headers, body = await read_response(reader)
    finally:
        writer.close()
    named = {name.lower(): value for name, value in headers}
    return int(status_line.split(b" ")[1]), named, body


def get(path: str, *extra: bytes, method: bytes = b"GET") -> bytes:
    lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: x", *extra, b"", b""]
    return b"\r\n".join(lines)


async def test_unknown_paths_are_404_and_other_methods_405(admin_port: Admin) -> None:
    """A path the admin port does not have is 404; a known path with a method it does not take
    is 405 with an Allow header; both with plain-text bodies, as aiohttp's were."""
    status, _, body = await exchange(admin_port.url, get("/nowhere"))
    assert (status, body) == (404, b"404: Not Found")
    status, headers, body = await exchange(admin_port.url, post("/metrics", b"x"))
    assert (status, headers[b"allow"], body) == (405, b"GET,HEAD", b"405: Method Not Allowed")
    status, headers, _ = await exchange(admin_port.url, get("/feedback"))
    assert (status, headers[b"allow"]) == (405, b"POST")


async def test_head_is_answered_like_get_without_a_body(admin_port: Admin) -> None:
    """HEAD /healthz: GET's status and Content-Length, and no body bytes after the head."""
    reader, writer = await connect(admin_port.url)
    try:
        writer.write(get("/healthz", method=b"HEAD") + get("/healthz"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        status_line, headers, body = await read_response(reader)  # the GET behind it
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Length: %d\r\n" % len(body) in head
    assert (status_line, json.loads(body)) == (b"HTTP/1.1 200 OK", {"status": "alive"})
    assert (b"Content-Type", b"application/json; charset=utf-8") in headers


async def test_readyz_says_why_with_200_or_503(admin_port: Admin) -> None:
    """/readyz: 200 with "ready" and the reason, or 503 with "not ready" and the reason."""
    status, _, body = await exchange(admin_port.url, get("/readyz"))
    assert (status, json.loads(body)) == (200, {"status": "ready", "reason": "all good"})
    admin_port.readiness = (False, "draining: shutting down")
    status, _, body = await exchange(admin_port.url, get("/readyz"))
    reason = {"status": "not ready", "reason": "draining: shutting down"}
    assert (status, json.loads(body)) == (503, reason)


@pytest.mark.parametrize(
    "accept",
    [
        b"",
        b"text/plain; version=0.0.4",
        b"application/openmetrics-text; version=1.0.0",
        b"text/plain;version=1.0.0;escaping=allow-utf-8",
    ],
)
async def test_metrics_content_type_follows_accept(admin_port: Admin, accept: bytes) -> None:
    """The Content-Type and body are what prometheus_client's choose_encoder makes of Accept."""
    extra = [b"Accept: " + accept] if accept else []
    status, headers, body = await exchange(admin_port.url, get("/metrics", *extra))
    encoder, content_type = choose_encoder(accept.decode())
    assert (status, headers[b"content-type"].decode()) == (200, content_type)
    assert body == encoder(admin_port.registry)


@pytest.mark.parametrize(
    ("accept_encoding", "compressed"),
    [
        (None, False),
        (b"gzip", True),
        (b"deflate, gzip;q=0.5", True),
        (b"gzip;q=0", False),
        (b"br, deflate", False),
    ],
)
async def test_metrics_are_gzipped_when_the_scraper_takes_gzip(
    admin_port: Admin, accept_encoding: bytes | None, compressed: bool
) -> None:
    """Prometheus sends Accept-Encoding: gzip. Gzipped or not, the body is the same exposition,
    and Vary says it depends on that header."""
    extra = [b"Accept-Encoding: " + accept_encoding] if accept_encoding is not None else []
    status, headers, body = await exchange(admin_port.url, get("/metrics", *extra))
    encoder, _ = choose_encoder("")
    assert (status, headers[b"vary"]) == (200, b"Accept-Encoding")
    assert headers.get(b"content-encoding") == (b"gzip" if compressed else None)
    assert (gzip.decompress(body) if compressed else body) == encoder(admin_port.registry)


async def test_keep_alive_serves_several_requests_on_one_connection(admin_port: Admin) -> None:
    """A scraper's connection stays open between requests."""
    reader, writer = await connect(admin_port.url)
    try:
        for path in ("/healthz", "/metrics", "/readyz"):
            writer.write(get(path))
            status_line, _, _ = await read_response(reader)
            assert status_line == b"HTTP/1.1 200 OK"
    finally:
        writer.close()


async def test_a_failing_readiness_check_is_a_500(admin_port: Admin) -> None:
    """A bug behind a route answers 500 without a traceback, and the connection closes."""

    def broken() -> tuple[bool, str]:
        raise RuntimeError("bug")

    app = make_admin_app(admin_port.registry, broken)
    server = AdminServer(app)
    await server.start("127.0.0.1", 0)
    try:
        reader, writer = await connect(url_of(server.address))
        writer.write(get("/readyz"))
        status_line, _, body = await read_response(reader)
        assert (status_line, body) == (b"HTTP/1.1 500 Internal Server Error", b"")
        assert await closed(reader)
        writer.close()
    finally:
        await server.stop()


ITEM = b'{"request_id": "r1", "label": 1}'


@pytest.mark.parametrize("authorization", [None, b"Bearer wrong", b"Basic czNjcmV0"])
async def test_feedback_without_the_token_is_401_with_a_challenge(
    admin_port: Admin, authorization: bytes | None
) -> None:
    """No token, a wrong one, or another scheme: 401, a reason and WWW-Authenticate."""
    extra = [b"Authorization: " + authorization] if authorization else []
    status, headers, body = await exchange(admin_port.url, post("/feedback", ITEM, *extra))
    assert status == 401
    assert headers[b"www-authenticate"] == b'Bearer realm="sidecar-feedback"'
    assert "token" in json.loads(body)["error"]
    assert admin_port.feedback.applied == []


async def test_feedback_with_the_token_is_applied(admin_port: Admin) -> None:
    """With the token, the items go to the recorder and its summary is the JSON answer."""
    status, headers, body = await exchange(
        admin_port.url, post("/feedback", b"[" + ITEM + b"," + ITEM + b"]", AUTHORIZED)
    )
    assert (status, json.loads(body)) == (200, {"matched": 0, "unmatched": 2})
    assert headers[b"content-type"] == b"application/json; charset=utf-8"
    assert [item.request_id for item in admin_port.feedback.applied] == ["r1", "r1"]


async def test_feedback_bad_json_is_400_with_a_reason(admin_port: Admin) -> None:
    """A body that is not JSON: 400 and a reason, from the recorder's parser."""
    status, _, body = await exchange(admin_port.url, post("/feedback", b"{not", AUTHORIZED))
    assert status == 400
    assert "not JSON" in json.loads(body)["error"]


@pytest.mark.parametrize("coding", [b"gzip", b"deflate"])
async def test_a_compressed_feedback_body_is_inflated(admin_port: Admin, coding: bytes) -> None:
    """A gzip or deflate body (Content-Encoding) is read as what it stands for, as aiohttp's
    server read it."""
    compress = gzip.compress if coding == b"gzip" else zlib.compress
    request = post("/feedback", compress(ITEM), AUTHORIZED, b"Content-Encoding: " + coding)
    status, _, body = await exchange(admin_port.url, request)
    assert (status, json.loads(body)["unmatched"]) == (200, 1)


async def test_a_compressed_body_is_bounded_by_what_it_inflates_to(
    admin_port: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small body that inflates past the limit is a 413; one that is not gzip, a 400."""
    monkeypatch.setattr(admin, "FEEDBACK_MAX_BYTES", 1000)
    bomb = gzip.compress(b" " * 1001)
    assert len(bomb) < 100
    request = post("/feedback", bomb, AUTHORIZED, b"Content-Encoding: gzip")
    status, _, body = await exchange(admin_port.url, request)
    assert (status, json.loads(body)) == (413, {"error": "body over 1000 bytes"})
    for broken in (b"not gzip at all", gzip.compress(ITEM)[:-12]):
        request = post("/feedback", broken, AUTHORIZED, b"Content-Encoding: gzip")
        status, _, body = await exchange(admin_port.url, request)
        assert status == 400
        assert "not valid gzip" in json.loads(body)["error"]


async def test_feedback_over_the_byte_limit_by_its_length_is_413_unread(admin_port: Admin) -> None:
    """A Content-Length over the limit is refused before a body byte is sent or read."""
    length = b"Content-Length: %d" % (admin.FEEDBACK_MAX_BYTES + 1)
    head = b"POST /feedback HTTP/1.1\r\nHost: x\r\n" + length + b"\r\n" + AUTHORIZED + b"\r\n\r\n"
    status, _, body = await exchange(admin_port.url, head)
    assert status == 413
    assert json.loads(body) == {"error": f"body over {admin.FEEDBACK_MAX_BYTES} bytes"}


async def test_a_chunked_feedback_body_over_the_limit_is_413(
    admin_port: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a length, the body is counted as it comes: past the limit, 413."""
    monkeypatch.setattr(admin, "FEEDBACK_MAX_BYTES", 100)
    chunk = b"x" * 80
    request = (
        b"POST /feedback HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + AUTHORIZED
        + b"\r\n\r\n"
        + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2
        + b"0\r\n\r\n"
    )
    status, _, body = await exchange(admin_port.url, request)
    assert (status, json.loads(body)) == (413, {"error": "body over 100 bytes"})


async def test_feedback_sends_100_continue_only_after_the_token(admin_port: Admin) -> None:
    """A client that waits for 100 Continue gets it once its token is accepted, then the
    answer; with a wrong token it gets the 401 without a 100 Continue first."""
    body = b"[" + b",".join([ITEM] * 3000) + b"]"  # over the size read before a route starts
    assert len(body) > admin.WHOLE_BODY_LIMIT
    head = b"POST /feedback HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body)
    expect = b"Expect: 100-continue\r\n"

    reader, writer = await connect(admin_port.url)
    try:
        writer.write(head + expect + AUTHORIZED + b"\r\n\r\n")
        continued = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert continued == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        status_line, _, answer = await read_response(reader)
    finally:
        writer.close()
    assert (status_line, json.loads(answer)["unmatched"]) == (b"HTTP/1.1 200 OK", 3000)

    reader, writer = await connect(admin_port.url)
    try:
        writer.write(head + expect + b"Authorization: Bearer wrong\r\n\r\n")
        status_line, _, _ = await read_response(reader)
    finally:
        writer.close()
    assert status_line == b"HTTP/1.1 401 Unauthorized"
