"""A lean keep-alive HTTP/1.1 client for the one upstream, on httptools' llhttp parser.

aiohttp's ClientSession costs about as much per request as the rest of the proxy together
(cookie jar, URL objects, tracing hooks, payload classes). The proxy needs none of that: it
already has the request line and the raw header bytes, and wants the raw response back. So a
request is written as bytes, and the response is parsed by llhttp straight into what the relay
needs: status, reason, raw headers and body chunks as they arrive.
"""

from __future__ import annotations

import asyncio
import functools
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Protocol, cast

import httptools

from sidecar.proxy.bodies import BodyBuffer
from sidecar.proxy.headers import (
    AmbiguousFraming,
    field_line,
    parse_length,
    relayable_codings,
    scan,
)
from sidecar.proxy.outbox import Outbox
from sidecar.proxy.upstream import (
    UpstreamError,
    UpstreamInvalid,
    UpstreamReset,
    UpstreamTimeout,
    UpstreamUnreachable,
)

RawHeaders = Sequence[tuple[bytes, bytes]]
Body = bytes | AsyncIterator[bytes] | None

_MAX_IDLE = 256
# RFC 9110 section 9.2.2: requests whose intended effect is the same sent once or twice. Only
# these may go again after a connection failed with the request possibly received.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class UpstreamResponse(BodyBuffer):
    """The head of an upstream reply, and its body as it arrives."""

    __slots__ = (
        "_connection",
        "content_length",
        "headers",
        "noted",
        "raw_headers",
        "reason",
        "status",
    )

    def __init__(
        self, connection: UpstreamConnection, status: int, reason: bytes, raw_headers: RawHeaders
    ) -> None:
        super().__init__(connection)
        self._connection = connection
        self.status = status
        self.reason = reason  # as sent
        self.raw_headers = raw_headers
        try:
            self.headers, self.noted = scan(raw_headers)  # the end-to-end ones; see headers.scan
        except AmbiguousFraming as exc:
            raise UpstreamInvalid(str(exc)) from None
        codings = self.noted.get(b"transfer-encoding")
        if codings is not None and not relayable_codings(codings):
            msg = f"transfer coding {codings.decode('latin-1')!r}: only chunked can be relayed"
            raise UpstreamInvalid(msg)
        self.content_length = parse_length(self.noted.get(b"content-length"))

    @property
    def arrived(self) -> bool:
        """The whole body has arrived, intact (it may not have been read yet)."""
        return self._done and self._error is None

    def release(self) -> None:
        """Hand the connection back: to the pool if the reply was complete, else closed. One
        released with reading paused (its reader left before the end) would stay paused: closed."""
        self._connection.finish(reusable=self.arrived and not self._paused)

    async def _wait(self) -> None:
        connection = self._connection
        connection.deadline = connection.loop.time() + connection.read_timeout
        try:
            await super()._wait()
        finally:
            connection.deadline = math.inf

    def time_out(self) -> None:
        if self._waiter is not None:
            msg = f"no bytes from the upstream for {self._connection.read_timeout} s"
            self.fail(UpstreamTimeout(msg))


class ReplyListener(Protocol):
    """Told once what became of a request sent on a connection: its reply's head arrived (with
    all of the body that came in the same read), or it failed before that."""

    def reply_head(self, response: UpstreamResponse) -> None: ...

    def reply_failed(self, error: UpstreamError) -> None: ...


class UpstreamHealth(Protocol):
    """Told what the proxy's own traffic says of the upstream, on each change only: the freshest
    health signal there is (sidecar.readiness acts on it)."""

    def upstream_failed(self, reason: str) -> None:
        """A connection was refused or timed out, or closed before any reply byte."""

    def upstream_answered(self) -> None:
        """A reply's head arrived after upstream_failed."""


class _HeadFuture:
    """The listener of a sender that awaits the reply's head."""

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[UpstreamResponse] = loop.create_future()

    def reply_head(self, response: UpstreamResponse) -> None:
        if not self.future.done():
            self.future.set_result(response)

    def reply_failed(self, error: UpstreamError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; llhttp calls the on_* methods as it parses."""

    __deletable__ = ("_parser",)  # see HttpConnection

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self.loop = loop
        self.read_timeout = pool.read_timeout
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: UpstreamResponse | None = None
        self._held = b""  # a request written at the end of the loop's turn: see proxy/outbox.py
        self._reason = b""  # of the response being parsed
        self._raw_headers: list[tuple[bytes, bytes]] = []  # of the response being parsed
        self._listener: ReplyListener | None = None  # of the request sent, until its head came
        self._announce: UpstreamResponse | None = None  # a head parsed in this read, not yet told
        self._informational = False
        self._keep_alive = False
        self._until_close = False  # the response's body ends where the connection does
        self._paused = False
        self._writable: asyncio.Future[None] | None = None
        self.sent_any = False  # bytes of the request in progress were handed to the socket
        self.received_any = False
        self.body_unsent = False  # the reply came before the request's body was all sent
        self.idle_since = 0.0  # loop time it went back to the pool
        self.closed = False
        self.skip_body = False
        self.deadline = math.inf  # while waiting for the upstream: give up after this loop time

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        error = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what a callback raised, if one did
            if isinstance(cause, UpstreamInvalid):
                error = cause
            else:
                error = UpstreamInvalid(f"unparseable response from the upstream: {exc}")
        # The head is told once the whole read is parsed: a small reply's body, which comes in
        # the same read, is then complete, and its listener can answer without waiting.
        if self._announce is not None:
            self._tell_head(self._announce)
        if error is not None:
            self._fail(error)
            self.close()

    def eof_received(self) -> bool | None:
        # A body with neither length nor chunks ends here (RFC 9112 section 6.3, rule 8): llhttp
        # would say so on llhttp_finish(), which httptools does not expose. A reset instead of
        # an EOF (connection_lost with an error) still cuts the body short.
        if self._until_close and self._response is not None:
            self._response.finish()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        del self._parser  # it holds our bound callbacks: see HttpConnection.connection_lost
        reason = f": {exc}" if exc else ""
        self._fail(UpstreamReset(f"upstream closed the connection{reason}"))
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # llhttp callbacks

    def on_status(self, reason: bytes) -> None:
        self._reason += reason  # llhttp may hand it over in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        reason, raw_headers = self._reason, self._raw_headers
        self._reason, self._raw_headers = b"", []
        # 1xx answers (100 Continue, 103 Early Hints) precede the real one: skip them.
        self._informational = 100 <= status < 200
        if self._informational:
            return
        response = self._response = UpstreamResponse(self, status, reason, raw_headers)
        # Asked here: once the message is complete llhttp has reset and no longer knows.
        self._keep_alive = self._parser.should_keep_alive()
        # No keep-alive and no length: the body may run to the close (RFC 9112 section 6.3).
        self._until_close = (
            not self._keep_alive
            and response.content_length is None
            and not _chunked(response.noted.get(b"transfer-encoding"))
        )
        if self._listener is not None:
            self._announce = response

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._informational:
            self._response.feed(body)

    def on_message_complete(self) -> None:
        if self._response is not None and not self._informational:
            self._response.finish()

    # Used by the pool and the response.

    def _tell_head(self, response: UpstreamResponse) -> None:
        self._announce = None
        if self._pool.failing:
            self._pool.answered()
        self.deadline = math.inf
        listener, self._listener = self._listener, None
        if self.skip_body:
            # llhttp cannot be told a HEAD reply has no body: take the head, then retire the
            # connection instead of waiting for a body that never comes.
            response.finish()
            self.closed = True
        if listener is not None:
            listener.reply_head(response)

    def send(self, data: bytes, listener: ReplyListener) -> None:
        """Write a whole request (at the end of the loop's turn); `listener` hears of its reply."""
        if not self._held:
            self._pool.outbox.hold(self)
        self._held += data
        self._expect_response(listener)

    def flush(self) -> None:
        """Write the request that send() held (the outbox calls this)."""
        data, self._held = self._held, b""
        if data and not self.closed and self._transport is not None:
            self._transport.write(data)
            self.sent_any = True

    async def send_stream(
        self, head: bytes, body: AsyncIterator[bytes], chunked: bool
    ) -> UpstreamResponse:
        """Write a request whose body arrives as it is sent; return the response's head. That
        may come before the body is all sent: an upstream that refuses an upload (413, 401)
        answers early, and the rest is not sent (as nginx does); the connection then closes."""
        assert self._transport is not None
        listener = _HeadFuture(self.loop)
        self._listener = listener  # not timed while the body comes at the client's pace
        self.body_unsent = True
        self._transport.write(head)
        self.sent_any = True
        sending = self.loop.create_task(self._send_body(body, chunked))
        sending.add_done_callback(functools.partial(self._body_failed, listener))
        try:
            return await listener.future
        finally:
            sending.cancel()  # if still sending: the reply is here, or nobody waits for it

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        async for chunk in body:
            if self.closed:
                return  # the upstream is gone: its listener has heard
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if self._writable is not None:
                # An upstream that stops reading the body is as silent as one that stops
                # answering: timed the same way.
                self.deadline = self.loop.time() + self.read_timeout
                await self._writable
                self.deadline = math.inf
        if self.closed:
            return
        if chunked:
            transport.write(b"0\r\n\r\n")
        self.body_unsent = False
        if self._listener is not None:  # the reply is still to come: from now on it is timed
            self.deadline = self.loop.time() + self.read_timeout

    def _body_failed(self, listener: _HeadFuture, sending: asyncio.Task[None]) -> None:
        """The body stopped coming (the client left, or its body broke off or timed out): the
        request fails with what the client's side raised."""
        error = None if sending.cancelled() else sending.exception()
        if error is None:
            return
        if self._listener is listener:
            self._listener = None
        if not listener.future.done():
            listener.future.set_exception(error)

    def _expect_response(self, listener: ReplyListener) -> None:
        if self.closed:  # gone while the body was being sent
            listener.reply_failed(UpstreamReset("upstream closed the connection"))
            return
        self._listener = listener
        self.deadline = self.loop.time() + self.read_timeout

    def time_out(self) -> None:
        """The upstream has been silent for read_timeout: fail whatever waits for it."""
        self.deadline = math.inf
        if self._listener is not None:
            listener, self._listener = self._listener, None
            msg = f"no response from the upstream within {self.read_timeout} s"
            listener.reply_failed(UpstreamTimeout(msg))
        elif self._response is not None:
            self._response.time_out()

    def body_full(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def body_drained(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def finish(self, reusable: bool) -> None:
        self._response = None
        self._listener = None
        self.deadline = math.inf
        reusable = reusable and not self.closed and self._keep_alive and not self.body_unsent
        self._pool.give_back(self, reusable)

    def close(self) -> None:
        """Close, forgetting the request in progress: nobody is told of its reply any more."""
        self.closed = True
        self._listener = self._announce = None
        self._held = b""  # a request not yet sent is not sent
        if self._transport is not None:
            self._transport.close()

    def _fail(self, error: UpstreamError) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            listener.reply_failed(error)
        elif self._response is not None:
            self._response.fail(error)


class UpstreamPool:
    """Keep-alive connections to one upstream, opened on demand and reused."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 4.0,
        health: UpstreamHealth | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = ssl.create_default_context() if tls else None
        self._connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # Idle connections are closed after this (seconds), before the upstream closes them
        # itself (uvicorn, under MLServer and KServe, does after 5 s): a request sent just as
        # the upstream closes fails, and a non-idempotent one cannot be sent again.
        self.keepalive_timeout = keepalive_timeout
        self._idle: list[UpstreamConnection] = []
        self._busy: set[UpstreamConnection] = set()
        self.outbox = Outbox()
        self._watch: asyncio.Task[None] | None = None
        self._host_header = f"{host}:{port}".encode("latin-1")
        self._health = health
        self.failing = False  # the last word on the upstream's health was a failure

    async def request(
        self,
        method: str,
        target: bytes,
        headers: RawHeaders,
        body: Body,
        noted: Mapping[bytes, bytes] | None = None,
        *,
        pooled: bool = True,
    ) -> UpstreamResponse:
        """Send one request; return once the response head has arrived.

        `target` is the request target as it goes on the wire (path and query). `headers` go
        out as given (end-to-end headers, raw bytes). A body of unknown length is sent chunked.
        A pooled connection that turns out closed before answering is tried once more on a
        fresh one, when may_resend() allows (the upstream closed it while idle). `pooled=False`
        goes straight to a fresh connection. `noted`, if the caller has it, is what
        headers.scan found in `headers`: it saves looking for Host and Content-Length again.
        """
        self._start_watch()
        head, chunked = self._head(method, target, headers, body, noted)
        connection = self.idle_connection() if pooled else None
        if connection is not None:
            try:
                return await self._send(connection, method, head, body, chunked)
            except UpstreamReset:
                self.drop(connection)
                if not isinstance(body, bytes | None) or not may_resend(method, connection):
                    raise
            except BaseException:  # a timeout, or the client gone: a late reply must not be read
                self.drop(connection)
                raise
        connection = await self._open()
        try:
            return await self._send(connection, method, head, body, chunked)
        except BaseException as exc:
            self.drop(connection)
            if isinstance(exc, UpstreamReset) and not connection.received_any:
                self.failed(str(exc))  # accepted, then closed unanswered: not serving
            raise

    def idle_connection(self) -> UpstreamConnection | None:
        """A pooled connection still open, taken out of the pool; None if there is none."""
        if not self._idle:
            return None
        expired = asyncio.get_running_loop().time() - self.keepalive_timeout
        while self._idle:
            connection = self._idle.pop()
            if connection.idle_since < expired:
                connection.close()  # and so are those below it, idle for longer
            elif not connection.closed:
                return connection
        return None

    def send_whole(
        self,
        connection: UpstreamConnection,
        method: str,
        target: bytes,
        headers: RawHeaders,
        body: bytes | None,
        noted: Mapping[bytes, bytes],
        listener: ReplyListener,
    ) -> None:
        """Send a request whose body is all here on `connection` (from idle_connection), and
        return: `listener` hears of the reply. request() for a caller that answers from
        callbacks. On reply_failed that caller drops the connection; after an UpstreamReset
        before any reply byte (`received_any`) it may retry with request(), as request() itself
        does: the upstream may have closed the connection while it was idle."""
        self._start_watch()
        head, _ = self._head(method, target, headers, body, noted)
        self._lend(connection, method)
        connection.send(head, listener)

    def _start_watch(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._time_out_silent())

    def _send(
        self, connection: UpstreamConnection, method: str, head: bytes, body: Body, chunked: bool
    ) -> Awaitable[UpstreamResponse]:
        self._lend(connection, method)
        if isinstance(body, bytes | None):  # then `head` ends with the body
            listener = _HeadFuture(connection.loop)
            connection.send(head, listener)
            return listener.future
        return connection.send_stream(head, body, chunked)

    def _lend(self, connection: UpstreamConnection, method: str) -> None:
        self._busy.add(connection)
        connection.skip_body = method == "HEAD"

    def drop(self, connection: UpstreamConnection) -> None:
        """Close a connection whose reply will not be read."""
        self._busy.discard(connection)
        connection.close()

    def give_back(self, connection: UpstreamConnection, reusable: bool) -> None:
        self._busy.discard(connection)
        if reusable and len(self._idle) < _MAX_IDLE:
            connection.sent_any = connection.received_any = False
            connection.idle_since = connection.loop.time()
            self._idle.append(connection)
        else:
            connection.close()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    async def _time_out_silent(self) -> None:
        """Fail the requests whose upstream has said nothing for read_timeout seconds.

        One sweep for all connections rather than a timer per request: arming and cancelling a
        timer (or asyncio.timeout()) for every request costs more than the rest of the pool's
        work on it. A timeout fires up to a tenth late (at most a second).
        """
        loop = asyncio.get_running_loop()
        interval = min(max(self.read_timeout / 10, 0.005), 1.0)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for connection in [c for c in self._busy if c.deadline < now]:
                connection.time_out()
            # The oldest idle connections are at the bottom: close those past keepalive_timeout.
            expired = now - self.keepalive_timeout
            while self._idle and self._idle[0].idle_since < expired:
                self._idle.pop(0).close()

    async def _open(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self, loop), self._host, self._port, ssl=self._tls
                )
        except TimeoutError:
            msg = f"connecting to {self._host}:{self._port} took over {self._connect_timeout} s"
        except OSError as exc:
            msg = f"cannot connect to {self._host}:{self._port}: {exc.strerror or exc}"
        else:
            return connection
        self.failed(msg)
        raise UpstreamUnreachable(msg)

    def failed(self, reason: str) -> None:
        """The proxy's traffic found the upstream not serving: tell `health`, once per change."""
        if not self.failing:
            self.failing = True
            if self._health is not None:
                self._health.upstream_failed(reason)

    def answered(self) -> None:
        """A reply came after failed(): the upstream serves again."""
        self.failing = False
        if self._health is not None:
            self._health.upstream_answered()

    def _head(
        self,
        method: str,
        target: bytes,
        headers: RawHeaders,
        body: Body,
        noted: Mapping[bytes, bytes] | None,
    ) -> tuple[bytes, bool]:
        """The request line and headers as they go on the wire, followed by the body when it is
        bytes (so that a whole request is one join), and whether a streamed body goes chunked."""
        if noted is None:
            names = {name.lower() for name, _ in headers}
            has_host, has_length = b"host" in names, b"content-length" in names
        else:
            has_host, has_length = b"host" in noted, b"content-length" in noted
        lines = [method.encode("latin-1") + b" " + target + b" HTTP/1.1", *map(field_line, headers)]
        if not has_host:
            lines.append(b"Host: " + self._host_header)
        whole = body if isinstance(body, bytes) else None
        chunked = body is not None and whole is None and not has_length
        if chunked:
            lines.append(b"Transfer-Encoding: chunked")
        elif whole is not None and not has_length and (whole or method in _BODY_METHODS):
            lines.append(b"Content-Length: %d" % len(whole))
        lines.append(b"")  # the blank line that ends the head
        lines.append(whole or b"")  # a whole body in the same join: no second copy
        return b"\r\n".join(lines), chunked


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def may_resend(method: str, connection: UpstreamConnection) -> bool:
    """Whether a request that failed on `connection` with no reply byte may be sent again on
    another: an idempotent one (RFC 9110 section 9.2.2), or any that provably never left
    (its write was dropped because the connection had closed first). Anything else may have
    reached the upstream, and a second copy could act twice: the client gets a 502."""
    return not connection.received_any and (method in IDEMPOTENT or not connection.sent_any)


def _chunked(codings: bytes | None) -> bool:
    """Whether chunked is the last transfer coding (the body's framing), as llhttp sees it;
    `codings` is every Transfer-Encoding value, joined (as headers.scan notes it)."""
    return codings is not None and codings.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
