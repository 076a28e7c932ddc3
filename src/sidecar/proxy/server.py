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
from collections.abc import AsyncIterator, Awaitable, Mapping
from types import MappingProxyType
from typing import Any

from sidecar.exchange import Exchange, ExchangeObserver
from sidecar.proxy.headers import (
    REQUEST_ID,
    HeaderView,
    RawHeaders,
    new_request_id,
    parse_length,
    trace_id,
)
from sidecar.proxy.http1 import BodyReader, ClientBodyTimeout, HttpConnection, Request
from sidecar.proxy.pool import UpstreamConnection, UpstreamPool, UpstreamResponse, may_resend
from sidecar.proxy.upstream import UpstreamError, UpstreamReset
from sidecar.proxy.usage import UsageFilter, ask_for_usage, usage_filter

# Bodies up to this size are read whole and sent with their Content-Length; larger ones stream
# through, so that a big upload is neither held in memory nor written in one blocking piece.
WHOLE_BODY_LIMIT = 1024 * 1024

_REQUEST_ID = REQUEST_ID.encode()
# Request ids are kept as the str of their bytes (latin-1, one char a byte), so that a client's
# id goes back out exactly as it came, whatever its bytes.
_ID_CODEC = "latin-1"
_PHRASES = {502: b"Bad Gateway", 504: b"Gateway Timeout"}


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_MAX_ARRIVALS = 100_000  # timing entries kept per response; the body cap bounds the rest

Body = bytes | AsyncIterator[bytes] | None


class _Unread:
    """The request body has not been taken from the client yet."""


_UNREAD = _Unread()


class ProxyHandler:
    """One call per request on the proxy port (an http1.Handler)."""

    def __init__(
        self,
        pool: UpstreamPool,
        observer: ExchangeObserver[Any],
        *,
        max_body_bytes: int,
        reply_request_id: bool = True,
    ) -> None:
        self.pool = pool
        self.observer = observer
        self.max_body = max_body_bytes
        # Add the request id to replies that carry none (README: on by default).
        self.reply_request_id = reply_request_id
        self.whole_body_limit = min(max_body_bytes, WHOLE_BODY_LIMIT)

    def __call__(self, request: Request, client: HttpConnection) -> Awaitable[None] | None:
        """A request that is all here and finds an idle upstream connection is sent at once and
        answered from the upstream connection's callbacks: no task, no await (most requests).
        Any other goes on as a coroutine."""
        exchange = _Exchange(self, request, client)
        body = request.body
        if (
            not isinstance(body, BodyReader)
            and b"expect" not in request.noted
            and not exchange.ticket.inject_usage
            and (upstream := self.pool.idle_connection()) is not None
        ):
            exchange.send_now(upstream, body)
            return None
        return exchange.run()


class _Exchange:
    """One request on its way through: sent and answered from callbacks (send_now) or by a
    coroutine (run), which the callbacks hand over to when they would have to wait."""

    __slots__ = ("_body", "_client", "_connection", "_handler", "_request", "headers", "record",
                 "request_id", "ticket")  # fmt: skip

    def __init__(self, handler: ProxyHandler, request: Request, client: HttpConnection) -> None:
        self._handler = handler
        self._request = request
        self._client = client
        self.ticket = handler.observer.begin(request.method, request.path)
        self.record = _Record(self.ticket.capture_bodies, handler.max_body)
        self._connection: UpstreamConnection | None = None  # while send_now's reply is awaited
        self._body: Body | _Unread = _UNREAD
        headers = request.end_to_end
        found = request.noted.get(b"x-request-id")
        if found:  # the client's id, kept
            self.request_id = found.decode(_ID_CODEC)
        else:
            self.request_id = new_request_id()
            headers = [*headers, (_REQUEST_ID, self.request_id.encode(_ID_CODEC))]
        self.headers = headers

    # From callbacks

    def send_now(self, connection: UpstreamConnection, body: bytes | None) -> None:
        request, record = self._request, self.record
        self._connection = connection
        self._body = record.whole_request(body)
        record.upstream_started = time.perf_counter()
        self._handler.pool.send_whole(
            connection, request.method, request.target, self.headers, self._body, request.noted,
            self,
        )  # fmt: skip
        if self._connection is not None:  # not answered yet, as it would be if the send failed
            self._client.on_hang_up(self._hang_up)

    def reply_head(self, upstream: UpstreamResponse) -> None:
        """The upstream's answer to send_now: sent on at once if it came whole."""
        self._connection = None
        if not upstream.arrived:
            self._client.continue_with(self.run(upstream))
            return
        try:
            _reply(upstream, self.request_id, self.record, self._handler.reply_request_id)
            _send_whole(self._client, upstream, self.record)
        except ConnectionError:  # the client has gone
            self.record.fail("client_disconnect")
        except Exception:  # a bug here: the client must not wait for ever
            upstream.release()
            self._tell_observer()
            self._client.handler_failed()
            return
        upstream.release()
        self._end()

    def reply_failed(self, error: UpstreamError) -> None:
        connection, self._connection = self._connection, None
        assert connection is not None  # a listener is told once, while send_now's reply is awaited
        self._handler.pool.drop(connection)
        if isinstance(error, UpstreamReset) and may_resend(self._request.method, connection):
            # Closed by the upstream while idle, most likely: once more, on a fresh one.
            self._client.continue_with(self.run(pooled=False))
            return
        self.record.fail(error.error_type)
        _answer_error(self._client, error, self.request_id, self.record)
        self._end()

    def _hang_up(self) -> None:
        """The client left while send_now's reply was awaited: the upstream request goes."""
        connection, self._connection = self._connection, None
        assert connection is not None  # on_hang_up holds only until the reply or its failure
        self._handler.pool.drop(connection)
        self.record.fail("client_disconnect")
        self._tell_observer()

    def _end(self) -> None:
        self._tell_observer()
        self._client.finished()

    def _tell_observer(self) -> None:
        """What became of the exchange, once it is over."""
        self._handler.observer.end(
            self.ticket, self.record.exchange(self._request, self.request_id)
        )

    # In a task

    async def run(self, upstream: UpstreamResponse | None = None, pooled: bool = True) -> None:
        """The exchange, or its rest once `upstream` (the reply's head) is here; `pooled=False`
        sends it on a fresh connection."""
        client, record = self._client, self.record
        try:
            if upstream is None:
                upstream = await self._send(pooled)
                if upstream is None:
                    return  # answered with the upstream's failure
            try:
                strip = _reply(upstream, self.request_id, record, self._handler.reply_request_id)
                if upstream.arrived and strip is None:
                    _send_whole(client, upstream, record)  # here whole by now: no await
                else:
                    await _relay(client, upstream, record, strip)
            finally:
                upstream.release()
        except ClientBodyTimeout:  # the connection answers it 408
            record.fail("client_body_timeout")
            record.status = 408
        except ConnectionError:  # a write to the client, or its body, failed: it has gone
            record.fail("client_disconnect")
        except asyncio.CancelledError:
            # The client went away and its connection cancelled us: the upstream request goes
            # with it (release() closes a connection whose reply was not complete).
            record.fail("client_disconnect")
            raise
        finally:
            self._tell_observer()

    async def _send(self, pooled: bool) -> UpstreamResponse | None:
        """The request, sent; the reply's head, or None once the client has the failure."""
        request, client, record, headers = self._request, self._client, self.record, self.headers
        if not isinstance(self._body, _Unread):  # after send_now's try: the body is read
            body = self._body
        else:
            if b"expect" in request.noted:
                headers = _continue_if_expected(client, headers, request.noted[b"expect"])
            if isinstance(request.body, BodyReader):
                body = await self._read_body(request.body)
            else:
                body = record.whole_request(request.body)
        noted: Mapping[bytes, bytes] | None = request.noted
        if self.ticket.inject_usage and isinstance(body, bytes):  # docs/llm.md: bytes change
            headers, body, record.strip_usage = ask_for_usage(headers, body)
            noted = None
        record.upstream_started = time.perf_counter()
        try:
            return await self._handler.pool.request(
                request.method, request.target, headers, body, noted, pooled=pooled
            )
        except Exception as exc:  # every upstream failure maps to an answer and a metric
            if isinstance(exc, ConnectionError) and not isinstance(exc, UpstreamError):
                raise  # the client's body stopped coming: its side failed, not the upstream
            error = exc if isinstance(exc, UpstreamError) else UpstreamError(repr(exc))
            record.fail(error.error_type)
            _answer_error(client, error, self.request_id, record)
            return None

    async def _read_body(self, reader: BodyReader) -> Body:
        """A body still arriving: streamed to the upstream, unless it is small (the client
        waited for 100 Continue before sending it)."""
        record, limit = self.record, self._handler.max_body
        length = parse_length(self._request.noted.get(b"content-length"))
        if length is not None and length <= self._handler.whole_body_limit:
            return record.whole_request(await reader.read_all())
        if length is not None and length > limit and record.request_chunks is not None:
            record.request_chunks = None
            record.truncated = True
        return _Streamed(reader, record, limit)


class _Streamed:
    """A request body relayed as it arrives, counted, and kept for the record up to `limit`
    bytes. A class rather than an async generator: the compiled build (setup.py) has none."""

    __slots__ = ("_limit", "_reader", "_record")

    def __init__(self, reader: BodyReader, record: _Record, limit: int) -> None:
        self._reader, self._record, self._limit = reader, record, limit

    def __aiter__(self) -> _Streamed:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._reader.__anext__()  # StopAsyncIteration at the end, passed on
        record = self._record
        record.request_size += len(chunk)
        if record.request_chunks is not None:
            if record.request_size <= self._limit:
                record.request_chunks.append(chunk)
            else:
                record.request_chunks = None
                record.truncated = True
        return chunk


def _send_whole(client: HttpConnection, upstream: UpstreamResponse, record: _Record) -> None:
    """A reply that has arrived whole: one write."""
    body = upstream.read_nowait() or b""
    record.add(body)
    record.upstream_done = time.perf_counter()
    client.send_head(
        upstream.status, upstream.reason, upstream.headers, upstream.content_length, body, end=True
    )


def _reply(
    upstream: UpstreamResponse, request_id: str, record: _Record, add_id: bool
) -> UsageFilter | None:
    """Settle the reply's head: the upstream's status line and end-to-end headers as sent, plus
    the request id if it did not send one (and `add_id`). The exchange is recorded under the id
    the client receives: the upstream's own when it set one (TorchServe does). Returns the usage
    filter its body must go through, if inject_usage rewrote the request."""
    own = upstream.noted.get(b"x-request-id")
    if own is not None:
        record.reply_id = own.decode(_ID_CODEC)
    elif add_id:
        upstream.headers.append((_REQUEST_ID, request_id.encode(_ID_CODEC)))
    record.status = upstream.status
    if not (record.capture or record.strip_usage):
        return None  # nobody reads the headers of an exchange whose bodies are not read
    view = record.response_headers = HeaderView(upstream.headers, upstream.noted)
    if not record.strip_usage:
        return None
    return usage_filter(upstream.status, view, upstream.content_length, True)


async def _relay(
    client: HttpConnection, upstream: UpstreamResponse, record: _Record, strip: UsageFilter | None
) -> None:
    """The reply's body as it arrives, after a head that waited for it or went ahead of it."""
    status, reason, headers = upstream.status, upstream.reason, upstream.headers
    length = upstream.content_length
    # A stream (no length) gets its head at once: an event stream's client sees the answer
    # start before the first event. A reply with a length waits for its first bytes.
    streaming = length is None
    if streaming:
        client.send_head(status, reason, headers, None)
    while True:
        try:
            chunk = await upstream.read()
        except UpstreamError as exc:  # the upstream broke off mid-body
            record.fail(exc.error_type)
            if not streaming:
                client.send_head(status, reason, headers, length)
            # The client's connection ends as the upstream's did: a truncated body, then EOF.
            client.close()
            return
        record.add(chunk)  # the sidecar's copy keeps what the upstream sent
        done = upstream.at_eof()
        if strip is not None:
            chunk = strip(chunk, done)
        if done:
            record.upstream_done = time.perf_counter()
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


class _Record:
    """What became of one exchange: status, sizes, timings, and capped copies of the bodies
    (with when each piece of the response arrived) for extraction."""

    __slots__ = (
        "_chunks",
        "_limit",
        "arrivals",
        "capture",
        "error",
        "reply_id",
        "request_chunks",
        "request_size",
        "response_headers",
        "size",
        "started",
        "status",
        "strip_usage",
        "truncated",
        "upstream_done",
        "upstream_started",
    )

    def __init__(self, capture: bool, limit: int) -> None:
        self.started = self.upstream_started = self.upstream_done = time.perf_counter()
        self._limit = limit
        self.capture = capture  # the bodies (and so the headers) are wanted for extraction
        self.request_chunks: list[bytes] | None = [] if capture else None
        self.request_size = 0
        self._chunks: list[bytes] | None = [] if capture else None
        # Client gone before any answer: nginx's 499, "client closed request".
        self.status = 499
        self.response_headers: Mapping[str, str] = _NO_HEADERS
        self.size = 0
        self.truncated = False  # a body was wanted but is over the limit
        self.error: str | None = None
        self.arrivals: list[tuple[int, float]] = []
        self.strip_usage = False  # inject_usage rewrote the request: hide the usage event
        self.reply_id: str | None = None  # the upstream's own X-Request-ID, if it sent one

    def whole_request(self, body: bytes | None) -> bytes | None:
        """A request body read whole (None or b"": none)."""
        if not body:
            return None
        self.request_size = len(body)
        if self.request_chunks is not None:
            if len(body) <= self._limit:
                self.request_chunks.append(body)
            else:
                self.request_chunks = None
                self.truncated = True
        return body

    def add(self, chunk: bytes) -> None:
        """Response bytes, as the upstream sent them."""
        self.size += len(chunk)
        if self._chunks is None or not chunk:
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

    def exchange(self, request: Request, request_id: str) -> Exchange:
        response = self._chunks
        headers = HeaderView(request.headers, request.noted) if self.capture else _NO_HEADERS
        return Exchange(
            method=request.method,
            path=request.path,
            status=self.status,
            request_id=self.reply_id or request_id,
            request_headers=headers,
            response_headers=self.response_headers,
            request_body=b"".join(self.request_chunks) if self.request_chunks else None,
            response_body=b"".join(response) if response is not None and not self.error else None,
            request_size=self.request_size,
            response_size=self.size,
            upstream_seconds=max(self.upstream_done - self.upstream_started, 0.0),
            total_seconds=time.perf_counter() - self.started,
            error=self.error,
            truncated=self.truncated,
            arrivals=self.arrivals,
            trace_id=trace_id(request.noted.get(b"traceparent")),
        )


def _continue_if_expected(client: HttpConnection, headers: RawHeaders, expect: bytes) -> RawHeaders:
    """Answer `Expect: 100-continue` ourselves: we read the body before the upstream sees it."""
    if expect.lower() != b"100-continue":
        return headers
    client.send_continue()
    return [(name, value) for name, value in headers if name.lower() != b"expect"]


def _answer_error(
    client: HttpConnection, error: UpstreamError, request_id: str, record: _Record
) -> None:
    """The proxy's own answer when the upstream gave none: a short JSON body with the reason."""
    payload = {"error": error.reason, "detail": str(error), "request_id": request_id}
    body = json.dumps(payload).encode()
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"%d" % len(body)),
        (_REQUEST_ID, request_id.encode(_ID_CODEC)),
    ]
    record.status, record.response_headers = error.status, HeaderView(headers)
    # The client may be gone already (it gave up waiting); then there is nobody left to tell.
    with contextlib.suppress(ConnectionError):
        client.send_head(
            error.status, _PHRASES.get(error.status, b"Error"), headers, len(body), body, end=True
        )
