"""The proxy port: forward every request to the upstream and relay its answer byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, NamedTuple

from aiohttp import hdrs, web
from multidict import CIMultiDict

from sidecar.exchange import Exchange, ExchangeObserver, RouteTicket
from sidecar.proxy.headers import REQUEST_ID, RawHeaders, end_to_end, ensure_request_id, find
from sidecar.proxy.pool import UpstreamPool, UpstreamResponse
from sidecar.proxy.upstream import UpstreamError
from sidecar.proxy.usage import ask_for_usage, usage_filter

log = logging.getLogger(__name__)

_STREAM_CHUNK = 64 * 1024
# Bodies up to this size are read whole; larger ones stream through (aiohttp warns, rightly, that
# writing a large bytes object at once would hold the event loop).
_WHOLE_BODY_LIMIT = 1024 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class RelayResponse(web.StreamResponse):
    """A StreamResponse that adds nothing: aiohttp would supply Date, Server and a default
    Content-Type, which the upstream may not have sent (TorchServe sends no Content-Type)."""

    def coalesce_headers(self) -> None:
        """Send the headers with the first body bytes instead of on their own."""
        self._send_headers_immediately = False

    async def _prepare_headers(self) -> None:
        absent = [
            name for name in (hdrs.DATE, hdrs.SERVER, hdrs.CONTENT_TYPE) if name not in self.headers
        ]
        await super()._prepare_headers()
        for name in absent:
            self.headers.popall(name, None)


class _Body(NamedTuple):
    data: bytes | AsyncIterator[bytes] | None
    captured: list[bytes] | None  # filled while streaming, when the route wants the body
    size: list[int]  # one cell, updated while streaming


_NO_BODY = _Body(None, None, [0])
_NO_HEADERS: Mapping[str, str] = CIMultiDict()
_MAX_ARRIVALS = 100_000  # timing entries kept per response; the body cap bounds the rest


class ProxyHandler:
    """aiohttp low-level handler: one call per request on the proxy port."""

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

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        ticket = self._observer.begin(request.method, request.path)
        headers = end_to_end(request.raw_headers)
        request_id = ensure_request_id(headers)
        headers = _continue_if_expected(request, headers)
        relayed = _Relayed(ticket.capture_bodies, self._max_body, started)
        body = _NO_BODY
        try:
            body = await self._read_body(request, ticket.capture_bodies)
            if ticket.inject_usage and isinstance(body.data, bytes):  # docs/llm.md: bytes change
                headers, data, relayed.strip_usage = ask_for_usage(headers, body.data)
                body = body._replace(data=data)
            relayed.upstream_started = time.perf_counter()
            try:
                upstream = await self._pool.request(
                    request.method, request.raw_path, headers, body.data
                )
            except Exception as exc:  # every failure maps to an answer and a metric
                error = exc if isinstance(exc, UpstreamError) else UpstreamError(repr(exc))
                relayed.fail(error.error_type)
                return await _answer_error(request, error, request_id, relayed)
            try:
                return await self._relay(request, upstream, request_id, relayed)
            finally:
                upstream.release()
        except asyncio.CancelledError:
            # The client went away and aiohttp cancelled us: the upstream request goes with it
            # (release() closes a connection whose reply was not complete).
            relayed.fail("client_disconnect")
            raise
        finally:
            self._finish(ticket, request, request_id, body, relayed)

    async def _read_body(self, request: web.BaseRequest, capture: bool) -> _Body:
        if not request.body_exists:
            return _NO_BODY
        length = request.content_length
        if length is not None and length <= min(self._max_body, _WHOLE_BODY_LIMIT):
            # The common case, small JSON: read it whole and send it with its Content-Length.
            data = await request.content.read()
            return _Body(data, [data] if capture else None, [len(data)])
        too_big = length is not None and length > self._max_body
        captured: list[bytes] | None = [] if capture and not too_big else None
        size = [0]
        return _Body(self._stream(request, captured, size), captured, size)

    async def _stream(
        self, request: web.BaseRequest, captured: list[bytes] | None, size: list[int]
    ) -> AsyncIterator[bytes]:
        async for chunk in request.content.iter_chunked(_STREAM_CHUNK):
            size[0] += len(chunk)
            if captured is not None:
                if size[0] <= self._max_body:
                    captured.append(chunk)
                else:
                    captured.clear()
                    captured = None
            yield chunk

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        request_id: str,
        relayed: _Relayed,
    ) -> RelayResponse:
        headers = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in end_to_end(upstream.raw_headers)
        )
        if REQUEST_ID not in headers:
            headers[REQUEST_ID] = request_id
        response = RelayResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        relayed.answered(upstream.status, headers)
        if upstream.content_length is not None:
            # Not a stream: hold the headers until the first body bytes, so that a small reply
            # leaves in one write. A stream (no length) gets its headers at once.
            response.coalesce_headers()
        try:
            await response.prepare(request)
        except ConnectionError:
            relayed.fail("client_disconnect")
            return response
        last = b""
        strip = usage_filter(upstream.status, headers, upstream.content_length, relayed.strip_usage)
        while True:
            try:
                chunk = await upstream.read()
            except UpstreamError as exc:  # the upstream broke off mid-body
                relayed.fail(exc.error_type)
                # Close the client's connection as the upstream's was: a truncated body, then EOF.
                response.force_close()
                if request.transport is not None:
                    request.transport.close()
                return response
            if not chunk:
                break
            relayed.add(chunk)  # the sidecar's copy keeps what the upstream sent
            if upstream.at_eof():
                last = chunk  # the final bytes go out with the end of the message
                break
            try:
                await response.write(chunk if strip is None else strip(chunk, False))
            except ConnectionError:
                relayed.fail("client_disconnect")
                return response
        relayed.upstream_done = time.perf_counter()
        try:
            await response.write_eof(last if strip is None else strip(last, True))
        except ConnectionError:
            relayed.fail("client_disconnect")
        return response

    def _finish(
        self,
        ticket: RouteTicket,
        request: web.BaseRequest,
        request_id: str,
        body: _Body,
        relayed: _Relayed,
    ) -> None:
        exchange = Exchange(
            method=request.method,
            path=request.path,
            status=relayed.status,
            request_id=request_id,
            request_headers=request.headers,
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


def _continue_if_expected(request: web.BaseRequest, headers: RawHeaders) -> RawHeaders:
    """Answer `Expect: 100-continue` ourselves: we read the body before the upstream sees it."""
    expect = find(headers, b"expect")
    if expect is None or expect.lower() != b"100-continue":
        return headers
    if request.transport is not None:
        request.transport.write(_CONTINUE)
    return [(name, value) for name, value in headers if name.lower() != b"expect"]


async def _answer_error(
    request: web.BaseRequest, error: UpstreamError, request_id: str, relayed: _Relayed
) -> web.Response:
    """The proxy's own answer when the upstream gave none: a short JSON body with the reason."""
    payload = {"error": error.reason, "detail": str(error), "request_id": request_id}
    response = web.Response(
        status=error.status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers=CIMultiDict({REQUEST_ID: request_id}),
    )
    relayed.answered(error.status, response.headers)
    # The client may be gone already (it gave up waiting); then there is nobody left to tell.
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write_eof()
    return response
