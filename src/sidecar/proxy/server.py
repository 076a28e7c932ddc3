"""The proxy port's relay: forward every request to the upstream and its answer back, byte for byte.

HTTP/1.1 itself (parsing, framing, keep-alive, flow control) is proxy/http1.py; the upstream side
is proxy/pool.py. This module decides what crosses: which headers, the request id, what the
client hears when the upstream fails, and what the observer is told about each exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, NamedTuple

from multidict import CIMultiDict

from sidecar.exchange import Exchange, ExchangeObserver, RouteTicket
from sidecar.proxy.headers import REQUEST_ID, HeaderView, RawHeaders, new_request_id, parse_length
from sidecar.proxy.http1 import BodyReader, HttpConnection, Request
from sidecar.proxy.pool import UpstreamPool, UpstreamResponse
from sidecar.proxy.upstream import UpstreamError
from sidecar.proxy.usage import ask_for_usage, usage_filter

# Bodies up to this size are read whole and sent with their Content-Length; larger ones stream
# through, so that a big upload is neither held in memory nor written in one blocking piece.
WHOLE_BODY_LIMIT = 1024 * 1024

_REQUEST_ID = REQUEST_ID.encode()
_PHRASES = {502: b"Bad Gateway", 504: b"Gateway Timeout"}


class _Body(NamedTuple):
    data: bytes | AsyncIterator[bytes] | None
    captured: list[bytes] | None  # filled while streaming, when the route wants the body
    size: list[int]  # one cell, updated while streaming


_NO_BODY = _Body(None, None, [0])
_NO_HEADERS: Mapping[str, str] = CIMultiDict()
_MAX_ARRIVALS = 100_000  # timing entries kept per response; the body cap bounds the rest


class ProxyHandler:
    """One call per request on the proxy port (an http1.Handler)."""

    def __init__(
        self,
        pool: UpstreamPool,
        observer: ExchangeObserver[Any],
        *,
        max_body_bytes: int,
    ) -> None:
        self._pool = pool
        self._observer = observer
        self._max_body = max_body_bytes
        self.whole_body_limit = min(max_body_bytes, WHOLE_BODY_LIMIT)

    async def __call__(self, request: Request, client: HttpConnection) -> None:
        started = time.perf_counter()
        ticket = self._observer.begin(request.method, request.path)
        headers = request.end_to_end
        found = request.noted.get(b"x-request-id")
        if found:  # the client's id, kept
            request_id = found.decode("latin-1")
        else:
            request_id = new_request_id()
            headers = [*headers, (_REQUEST_ID, request_id.encode())]
        if b"expect" in request.noted:
            headers = _continue_if_expected(client, headers, request.noted[b"expect"])
        relayed = _Relayed(ticket.capture_bodies, self._max_body, started)
        body = _NO_BODY
        try:
            if isinstance(request.body, BodyReader):
                body = await self._read_body(request, request.body, ticket.capture_bodies)
            else:
                body = self._whole_body(request.body, ticket.capture_bodies)
            noted: Mapping[bytes, bytes] | None = request.noted
            if ticket.inject_usage and isinstance(body.data, bytes):  # docs/llm.md: bytes change
                headers, data, relayed.strip_usage = ask_for_usage(headers, body.data)
                body, noted = body._replace(data=data), None
            relayed.upstream_started = time.perf_counter()
            try:
                upstream = await self._pool.request(
                    request.method, request.target.decode("latin-1"), headers, body.data, noted
                )
            except Exception as exc:  # every failure maps to an answer and a metric
                error = exc if isinstance(exc, UpstreamError) else UpstreamError(repr(exc))
                relayed.fail(error.error_type)
                _answer_error(client, error, request_id, relayed)
                return
            try:
                await _relay(client, upstream, request_id, relayed)
            finally:
                upstream.release()
        except asyncio.CancelledError:
            # The client went away and its connection cancelled us: the upstream request goes
            # with it (release() closes a connection whose reply was not complete).
            relayed.fail("client_disconnect")
            raise
        finally:
            self._finish(ticket, request, request_id, body, relayed)

    def _whole_body(self, data: bytes | None, capture: bool) -> _Body:
        """The common case, small JSON: read whole before the handler started."""
        if not data:
            return _NO_BODY
        keep = capture and len(data) <= self._max_body
        return _Body(data, [data] if keep else None, [len(data)])

    async def _read_body(self, request: Request, reader: BodyReader, capture: bool) -> _Body:
        """A body still arriving: streamed to the upstream, unless it is small (the client
        waited for 100 Continue before sending it)."""
        length = parse_length(request.noted.get(b"content-length"))
        if length is not None and length <= self.whole_body_limit:
            return self._whole_body(await reader.read_all(), capture)
        too_big = length is not None and length > self._max_body
        captured: list[bytes] | None = [] if capture and not too_big else None
        size = [0]
        return _Body(self._stream(reader, captured, size), captured, size)

    async def _stream(
        self, reader: BodyReader, captured: list[bytes] | None, size: list[int]
    ) -> AsyncIterator[bytes]:
        async for chunk in reader:
            size[0] += len(chunk)
            if captured is not None:
                if size[0] <= self._max_body:
                    captured.append(chunk)
                else:
                    captured.clear()
                    captured = None
            yield chunk

    def _finish(
        self,
        ticket: RouteTicket,
        request: Request,
        request_id: str,
        body: _Body,
        relayed: _Relayed,
    ) -> None:
        exchange = Exchange(
            method=request.method,
            path=request.path,
            status=relayed.status,
            request_id=request_id,
            request_headers=HeaderView(request.headers),
            response_headers=relayed.headers,
            request_body=b"".join(body.captured) if body.captured else None,
            response_body=relayed.body(),
            request_size=body.size[0],
            response_size=relayed.size,
            upstream_seconds=max(relayed.upstream_done - relayed.upstream_started, 0.0),
            total_seconds=time.perf_counter() - relayed.started,
            error=relayed.error,
            truncated=relayed.truncated
            or (ticket.capture_bodies and body.size[0] > self._max_body),
            arrivals=relayed.arrivals,
        )
        self._observer.end(ticket, exchange)


async def _relay(
    client: HttpConnection, upstream: UpstreamResponse, request_id: str, relayed: _Relayed
) -> None:
    """The upstream's reply to the client: its status line and end-to-end headers as sent (plus
    the request id), and its body as it arrives."""
    headers = upstream.headers
    if b"x-request-id" not in upstream.noted:
        headers.append((_REQUEST_ID, request_id.encode()))
    view = HeaderView(headers)
    relayed.answered(upstream.status, view)
    status, length = upstream.status, upstream.content_length
    reason = upstream.reason
    strip = usage_filter(status, view, length, True) if relayed.strip_usage else None
    # A stream (no length, more to come) gets its head at once: an event stream's client sees
    # the answer start before the first event. Otherwise the head waits for the body, so that
    # a small reply, which has usually arrived whole, leaves in one write.
    streaming = length is None and not upstream.at_eof()
    try:
        if streaming:
            client.send_head(status, reason, headers, None)
        while True:
            try:
                chunk = upstream.read_nowait()
                if chunk is None:
                    chunk = await upstream.read()
            except UpstreamError as exc:  # the upstream broke off mid-body
                relayed.fail(exc.error_type)
                if not streaming:
                    client.send_head(status, reason, headers, length)
                # The client's connection ends as the upstream's did: a truncated body, then EOF.
                client.close()
                return
            if chunk:
                relayed.add(chunk)  # the sidecar's copy keeps what the upstream sent
            done = upstream.at_eof()
            if strip is not None:
                chunk = strip(chunk, done)
            if done:
                relayed.upstream_done = time.perf_counter()
                if streaming:
                    client.end_body(chunk)
                else:
                    client.send_head(status, reason, headers, length, chunk, end=True)
                return
            if not streaming:
                client.send_head(status, reason, headers, length)
                streaming = True
            client.send_body(chunk)
            if client.writing_paused:
                await client.drain()
    except ConnectionError:
        relayed.fail("client_disconnect")


class _Relayed:
    """What became of one exchange's response: status, size, timings, and a capped copy of the
    body (with when each piece arrived) for extraction."""

    __slots__ = (
        "_chunks",
        "_limit",
        "arrivals",
        "error",
        "headers",
        "size",
        "started",
        "status",
        "strip_usage",
        "truncated",
        "upstream_done",
        "upstream_started",
    )

    def __init__(self, capture: bool, limit: int, started: float) -> None:
        self._chunks: list[bytes] | None = [] if capture else None
        self._limit = limit
        self.started = started
        self.upstream_started = started
        self.upstream_done = started
        # Client gone before any answer: nginx's 499, "client closed request".
        self.status = 499
        self.headers: Mapping[str, str] = _NO_HEADERS
        self.size = 0
        self.truncated = False
        self.error: str | None = None
        self.arrivals: list[tuple[int, float]] = []
        self.strip_usage = False  # inject_usage rewrote the request: hide the usage event

    def answered(self, status: int, headers: Mapping[str, str]) -> None:
        self.status = status
        self.headers = headers

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._chunks is None:
            return
        if self.size <= self._limit:
            self._chunks.append(chunk)
            # (bytes so far, seconds since the request arrived): streams (SSE) are timed by it.
            if len(self.arrivals) < _MAX_ARRIVALS:
                self.arrivals.append((self.size, time.perf_counter() - self.started))
        else:
            self._chunks = None
            self.arrivals.clear()
            self.truncated = True

    def fail(self, error_type: str) -> None:
        self.error = error_type
        self.upstream_done = time.perf_counter()

    def body(self) -> bytes | None:
        if self._chunks is None or self.error is not None:
            return None
        return b"".join(self._chunks)


def _continue_if_expected(client: HttpConnection, headers: RawHeaders, expect: bytes) -> RawHeaders:
    """Answer `Expect: 100-continue` ourselves: we read the body before the upstream sees it."""
    if expect.lower() != b"100-continue":
        return headers
    client.send_continue()
    return [(name, value) for name, value in headers if name.lower() != b"expect"]


def _answer_error(
    client: HttpConnection, error: UpstreamError, request_id: str, relayed: _Relayed
) -> None:
    """The proxy's own answer when the upstream gave none: a short JSON body with the reason."""
    payload = {"error": error.reason, "detail": str(error), "request_id": request_id}
    body = json.dumps(payload).encode()
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"%d" % len(body)),
        (_REQUEST_ID, request_id.encode()),
    ]
    relayed.answered(error.status, HeaderView(headers))
    # The client may be gone already (it gave up waiting); then there is nobody left to tell.
    with contextlib.suppress(ConnectionError):
        client.send_head(
            error.status, _PHRASES.get(error.status, b"Error"), headers, len(body), body, end=True
        )
