"""HTTP/1.1 on the proxy port: an asyncio.Protocol per client connection, llhttp, raw bytes out.

aiohttp's server builds a request object, a URL, a header multidict, a payload stream and a
response object for every request: on one core it answers about 16k requests/s with a fixed
body, where a bare asyncio.Protocol on llhttp answers over 100k. The relay needs none of it:
the request line and raw header bytes in, raw bytes out. So this module does only HTTP/1.1
itself (parsing, message framing, keep-alive, pipelining, flow control, graceful close) and
hands each request to a handler, which answers through the connection's send_* methods.

The handler is called as soon as a request is parsed, from the protocol callback. It either
takes the request on from there with callbacks of its own (the proxy does so for a whole
request that finds an idle upstream connection: most requests, and no task to switch to), and
says when it is done with `finished()`; or it returns an awaitable, which the connection runs
in a task. A task is cancelled when the client hangs up, which ends the request in progress,
upstream included; a handler working from callbacks hears of it through `on_hang_up`. One
request is answered at a time per connection. Pipelined requests wait in order, and reading
pauses while any wait, so a client cannot queue without bound.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools
from mypy_extensions import mypyc_attr

from sidecar.proxy.bodies import BodyBuffer
from sidecar.proxy.headers import (
    AmbiguousFraming,
    RawHeaders,
    field_line,
    parse_length,
    relayable_codings,
    scan,
)
from sidecar.proxy.outbox import Outbox

log = logging.getLogger(__name__)

Handler = Callable[["Request", "HttpConnection"], Awaitable[None] | None]
"""Answers a request: an awaitable to run in a task, or None once it has taken the request on
from callbacks (it then calls HttpConnection.finished(), see the module's docstring)."""

# Request line and headers together, like nginx's 4 x 8 KiB large_client_header_buffers (more
# generous): beyond it the client gets 431 and the connection closes.
MAX_HEAD = 64 * 1024
# After a last answer to bad input, how long (seconds) to keep draining what the client still
# sends before closing: closing with unread bytes would send a reset, which can destroy the
# answer before the client reads it (nginx's lingering close does the same).
_LINGER = 2.0

# llhttp refuses bytes over 0x7f in a request target; shown to it as "x" (see _take_raw_target).
_ASCII_ONLY = bytes.maketrans(bytes(range(0x80, 0x100)), b"x" * 0x80)
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")}
_BODILESS_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNKED = b"Transfer-Encoding: chunked"
_CLOSE = b"Connection: close"
_KEEP_ALIVE = b"Connection: keep-alive"  # an HTTP/1.0 client keeps the connection only if told
_LAST_CHUNK = b"0\r\n\r\n"
_GONE = "the client closed the connection"


def _last_word(status: bytes) -> bytes:
    """An empty answer after which the connection closes: for input we cannot go on from."""
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


_BAD_REQUEST = _last_word(b"400 Bad Request")
_REQUEST_TIMEOUT = _last_word(b"408 Request Timeout")
_HEAD_TOO_LARGE = _last_word(b"431 Request Header Fields Too Large")
_SERVER_ERROR = _last_word(b"500 Internal Server Error")
_NOT_IMPLEMENTED = _last_word(b"501 Not Implemented")


class _Refused(Exception):
    """Raised from a parser callback to stop llhttp at a head we will not relay; `answer` is
    the client's last word."""

    def __init__(self, answer: bytes) -> None:
        super().__init__()
        self.answer = answer


@mypyc_attr(native_class=False)  # the compiled build (setup.py): mypyc cannot derive from OSError
class ClientBodyTimeout(ConnectionError):
    """The client sent no body byte for client_body_timeout seconds: it is answered 408."""


class Request:
    """One parsed request. `target` is the request target exactly as sent (path and query);
    `path` is its path, percent-decoded, without the query. `headers` are all of them as sent,
    `end_to_end` and `noted` what headers.scan makes of them. `body` is the whole body when it
    was small and complete before the handler started, a BodyReader while it is still arriving,
    or None when there is none."""

    __slots__ = (
        "body",
        "end_to_end",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "noted",
        "path",
        "target",
    )

    def __init__(
        self, method: str, target: bytes, headers: RawHeaders, http11: bool, keep_alive: bool
    ) -> None:
        self.method = method
        self.target = target
        self.path = _path(target)
        self.headers = headers
        self.end_to_end, self.noted = scan(headers)
        self.http11 = http11
        self.keep_alive = keep_alive
        self.body: bytes | BodyReader | None = None


def _head_size(target: bytes, headers: RawHeaders) -> int:
    return len(target) + sum(len(name) + len(value) + 4 for name, value in headers)


def _path(target: bytes) -> str:
    path = target.split(b"?", 1)[0]
    if not path.startswith(b"/"):
        if path == b"*":  # OPTIONS * HTTP/1.1
            return "*"
        path = urlsplit(path).path or b"/"  # absolute-form: a client that takes us for a proxy
    text = path.decode("utf-8", "replace")
    return unquote(text) if "%" in text else text


def _refusal(request: Request) -> bytes | None:
    """The answer to a head the proxy will not relay, or None. RFC 9112 section 3.2: two Host
    headers, or none in HTTP/1.1, are a 400 (which Host would the upstream route by?). Section
    6.1: a transfer coding other than chunked is a 501, as nginx answers; llhttp takes the
    chunks off, and the coding under them would be forwarded as if there were none."""
    host = request.noted.get(b"host")
    if (b"," in host) if host is not None else request.http11:
        return _BAD_REQUEST
    codings = request.noted.get(b"transfer-encoding")
    if codings is not None and not relayable_codings(codings):
        return _NOT_IMPLEMENTED
    return None


class BodyReader(BodyBuffer):
    """A request body still arriving: read it piece by piece (async for) or whole (read_all).

    Reading from the client pauses while too much is buffered here (the upstream is slower than
    the client), and resumes as the handler takes it.
    """

    __slots__ = ()

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def __aiter__(self) -> BodyReader:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read()
        if not chunk:
            raise StopAsyncIteration
        return chunk


class HttpConnection(asyncio.Protocol):
    """One client connection: llhttp calls the on_* methods as it parses, the handler answers
    through send_head / send_body / end_body."""

    # connection_lost() deletes the parser; the compiled build (setup.py) must be told.
    __deletable__ = ("_parser",)
    __slots__ = (
        "_body_full",
        "_body_mark",
        "_body_received",
        "_body_since",
        "_broken",
        "_chunked",
        "_chunks",
        "_collecting",
        "_current",
        "_done",
        "_hang_up",
        "_head_sent",
        "_head_size",
        "_headers",
        "_held",
        "_keep",
        "_linger",
        "_loop",
        "_lost",
        "_parser",
        "_parsing",
        "_queue",
        "_raw_target",
        "_reader",
        "_reading_paused",
        "_server",
        "_transport",
        "_unsent",
        "_unsent_since",
        "_url",
        "_worker",
        "_write_waiter",
        "_writing_paused",
        "draining",
        "idle_since",
    )

    def __init__(self, server: Http1Server, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._lost = False
        self.draining = False  # the server is stopping: close after the current response
        self.idle_since = self._loop.time()
        # The message being parsed: its request line and headers, then its body.
        self._url = b""
        self._raw_target: bytes | None = None  # the target as sent, where llhttp saw another
        self._headers: RawHeaders = []
        self._head_size = 0  # bytes received towards the next request's head
        self._parsing: Request | None = None  # headers complete, body still arriving
        self._chunks: list[bytes] = []  # that body, while it is small enough to wait for
        self._collecting = False  # decided: wait for the whole (small) body before dispatching
        self._reader: BodyReader | None = None  # that body, when the handler already has it
        # The request being answered, those pipelined behind it, and how it is answered: by a
        # task, or from callbacks that want to hear if the client hangs up.
        self._current: Request | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._hang_up: Callable[[], None] | None = None
        self._broken: bytes | None = None  # unparseable input: this answer once the queue is done
        self._linger: asyncio.TimerHandle | None = None
        # The response being written, and what of it waits for the end of the loop's turn.
        self._held = b""
        self._head_sent = False
        self._done = False
        self._chunked = False
        self._keep = False
        # Flow control, both ways.
        self._reading_paused = False
        self._body_full = False
        self._writing_paused = False
        self._write_waiter: asyncio.Future[None] | None = None
        # What the transport held for the client at the last sweep, and since when.
        self._unsent = 0
        self._unsent_since = 0.0
        # Body bytes received, and what the sweep saw of them last (request, count) and when.
        self._body_received = 0
        self._body_mark: tuple[Request, int] | None = None
        self._body_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._broken is not None or self._linger is not None:
            return  # past a last word: read and dropped
        if self._parsing is None:
            self._head_size += len(data)
            if not self._url and not self._headers and not data.isascii():
                data = self._take_raw_target(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade (WebSocket) or CONNECT was relayed as a plain request, without its
            # Upgrade header; whatever follows it is not HTTP, so the connection ends there.
            self._reject(b"")
            return
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            self._reject(refused.answer if isinstance(refused, _Refused) else _BAD_REQUEST)
            return
        if self._parsing is None:
            if self._head_size > MAX_HEAD:
                self._reject(_HEAD_TOO_LARGE)
        elif self._reader is None and not self._collecting:
            self._body_pending(self._parsing)

    def _take_raw_target(self, data: bytes) -> bytes:
        """`data`, which starts a request line, with the bytes over 0x7f of its target shown to
        llhttp as "x"; the target as sent is kept for the request. llhttp refuses them, but a
        UTF-8 path (/café) is common, and nginx relays it as it came. A request line split over
        two reads, or behind another request in one read, still gets 400."""
        end = data.find(b"\n")
        line = data[:end]
        start, stop = line.find(b" ") + 1, line.rfind(b" ")
        if end < 0 or not 0 < start < stop or not (line[:start] + line[stop:]).isascii():
            return data  # not a whole request line, or the bytes are outside its target
        self._raw_target = line[start:stop]
        return data[:start] + self._raw_target.translate(_ASCII_ONLY) + data[stop:]

    def eof_received(self) -> bool | None:
        return None  # a client that stops sending has left: close, cancelling its request

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        # The parser holds our bound callbacks: left, the pair would wait for the cyclic
        # collector with whatever the connection holds (tests/test_big_bodies.py).
        del self._parser
        if self._linger is not None:
            self._linger.cancel()
        self._queue.clear()
        if self._reader is not None:
            self._reader.fail(ConnectionResetError(_GONE))
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            # Cancelling the task ends the request in progress, upstream included. A callback,
            # not the task's own finally: a task cancelled before its first step never runs it.
            # Not kept: the task's CancelledError holds a traceback that holds this connection.
            worker.cancel()
            worker.add_done_callback(lambda _: self._server.forget(self))
            return
        hang_up, self._hang_up = self._hang_up, None
        if hang_up is not None:
            hang_up()
        self._server.forget(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)

    # llhttp callbacks (no on_message_begin: what it would reset, on_headers_complete does)

    def on_url(self, url: bytes) -> None:
        self._url += url  # llhttp may hand over a long target in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        # _head_size counts whole reads, so it can also hold body bytes: count exactly if over.
        if self._head_size > MAX_HEAD and _head_size(self._url, self._headers) > MAX_HEAD:
            raise _Refused(_HEAD_TOO_LARGE)
        parser = self._parser
        method = parser.get_method()
        try:
            request = Request(
                _METHODS.get(method) or method.decode("latin-1"),
                self._url if self._raw_target is None else self._raw_target,
                self._headers,
                parser.get_http_version() == "1.1",
                # Asked here: once the message is complete llhttp has reset and no longer knows.
                parser.should_keep_alive(),
            )
        except AmbiguousFraming:
            raise _Refused(_BAD_REQUEST) from None
        refusal = _refusal(request)
        if refusal is not None:
            raise _Refused(refusal)
        self._parsing = request
        self._url = b""
        self._raw_target = None
        self._headers = []
        self._head_size = 0

    def on_body(self, body: bytes) -> None:
        self._body_received += len(body)
        if self._reader is not None:
            self._reader.feed(body)
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        if request is None:
            return
        self._parsing = None
        if self._reader is not None:
            self._reader.finish()
            self._reader = None
            return
        self._collecting = False
        if self._chunks:
            chunks, self._chunks = self._chunks, []
            request.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._dispatch(request)

    # The requests, in order.

    def _body_pending(self, request: Request) -> None:
        """A body is still arriving after this read: wait for it whole if it is small and the
        client is not waiting for a 100 Continue, else start the handler now and stream it."""
        length = parse_length(request.noted.get(b"content-length"))
        expect = b"expect" in request.noted
        if length is not None and length <= self._server.whole_body_limit and not expect:
            self._collecting = True
            return
        reader = self._reader = request.body = BodyReader(self)
        for chunk in self._chunks:
            reader.feed(chunk)
        self._chunks = []
        self._dispatch(request)

    def _dispatch(self, request: Request) -> None:
        if self._current is None:
            self._start(request)
        else:
            self._queue.append(request)
            self._update_reading()

    def _start(self, request: Request) -> None:
        self._current = request
        self._head_sent = self._done = self._chunked = False
        # Draining, the last request the client has sent says Connection: close.
        self._keep = request.keep_alive and not (self.draining and not self._more_behind())
        try:
            pending = self._server.handler(request, self)
        except Exception:
            self.handler_failed()
            return
        if pending is not None:
            self.continue_with(pending)

    def continue_with(self, pending: Awaitable[None]) -> None:
        """The request in progress goes on in a task (cancelled if the client hangs up), which
        calls finished() when `pending` is done."""
        self._hang_up = None
        self._worker = self._loop.create_task(self._run(pending))

    def on_hang_up(self, callback: Callable[[], None]) -> None:
        """Call `callback` if the client leaves before the request in progress is finished()."""
        self._hang_up = callback

    async def _run(self, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception:
            self._worker = None
            self.handler_failed()
            return
        self._worker = None
        self.finished()

    def handler_failed(self) -> None:
        """Called from an except block when the handler has a bug: the client must not wait for
        ever. It gets a 500 if its answer has not begun, and the connection closes."""
        method = self._current.method if self._current is not None else None
        log.exception("request handler failed", extra={"method": method})
        if not self._head_sent and not self._lost:
            self._write(_SERVER_ERROR)
        self._keep = False
        self.finished()

    def finished(self) -> None:
        """The request in progress is answered: on to the next, or close."""
        request, self._current = self._current, None
        self._hang_up = None
        if request is None or self._lost:
            return
        self.idle_since = self._loop.time()
        if isinstance(request.body, BodyReader) and not request.body.complete:
            self._answered_early()
        elif not (self._done and self._keep) or (self.draining and not self._more_behind()):
            self._close()
        elif self._queue:
            following = self._queue.popleft()
            self._update_reading()
            self._start(following)
        elif self._broken is not None:
            self._last_word(self._broken)

    def _answered_early(self) -> None:
        """The request was answered before its body was all read (an upstream that refused an
        upload, a body that broke off or timed out): the rest of the body is in the way."""
        if self._broken is not None and not self._head_sent:
            self._last_word(self._broken)  # the body's own fault: 400, or 408
        elif self._done:
            # Closed at once with unread bytes, the connection would send a reset, which can
            # destroy the answer before the client reads it.
            self._last_word(b"")
        else:
            self._close()

    def _more_behind(self) -> bool:
        """Whether the client has sent more than the request in progress: requests waiting,
        or one partly here."""
        partial = self._parsing is not None and self._parsing is not self._current
        return bool(partial or self._queue or self._head_size or self._url or self._headers)

    def _reject(self, answer: bytes, error: ConnectionError | None = None) -> None:
        """Input we cannot go on from: answer it (after the requests before it), then close.
        From here on, whatever the client sends is read and dropped."""
        self._broken = answer
        if self._reader is not None:
            # Inside a body already being relayed: that exchange cannot end well, so it ends
            # here (finished() answers, unless the upstream's reply has begun).
            self._reader.fail(error or ConnectionResetError("malformed request body"))
            self._reader = None
        elif self._current is None:
            self._last_word(answer)

    def body_stalled(self, now: float) -> float:
        """For how long (seconds) a request's body has been awaited without a byte coming; 0
        when none is awaited or reading is paused (the upstream is slower, not the client).
        Sampled by the server's sweep, like stalled()."""
        request = self._parsing
        if request is None or self._reading_paused or self._broken is not None:
            self._body_mark = None
            return 0.0
        mark = (request, self._body_received)
        if mark != self._body_mark:
            self._body_mark, self._body_since = mark, now
        return now - self._body_since

    def body_timed_out(self) -> None:
        """No body byte for client_body_timeout: 408, and its request (upstream too) ends."""
        self._body_mark = None
        self._reject(_REQUEST_TIMEOUT, ClientBodyTimeout("no request body byte in time"))

    def _last_word(self, answer: bytes) -> None:
        """Send `answer` (if any), end our side, drain the client's for a moment, close."""
        transport = self._transport
        if transport is None or self._lost or self._linger is not None:
            return
        if self._held:
            self.flush()
        if answer:
            transport.write(answer)
        if not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        self._body_full = False
        self._update_reading()
        self._linger = self._loop.call_later(_LINGER, self._close)

    # Flow control

    def body_full(self) -> None:
        self._body_full = True
        self._update_reading()

    def body_drained(self) -> None:
        self._body_full = False
        self._update_reading()

    def _update_reading(self) -> None:
        pause = self._body_full or bool(self._queue)
        if pause != self._reading_paused and self._transport is not None and not self._lost:
            self._reading_paused = pause
            if pause:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    # Answering the current request

    def send_continue(self) -> None:
        """`100 Continue`, if the client may be holding its body back for it."""
        body = self._current.body if self._current is not None else None
        if isinstance(body, BodyReader) and not body.complete and not self._head_sent:
            self._write(_CONTINUE)

    def send_head(
        self,
        status: int,
        reason: bytes,
        headers: RawHeaders,
        length: int | None,
        body: bytes = b"",
        end: bool = False,
    ) -> None:
        """The status line and headers, written as given; `length` is the Content-Length they
        carry, or None for a body of unknown length, which goes out chunked (close-delimited to
        an HTTP/1.0 client). With `end`, `body` is the whole body, in the same write."""
        request = self._current
        assert request is not None
        self._head_sent = True
        lines = [b"HTTP/1.1 %d %s" % (status, reason), *map(field_line, headers)]
        if request.method == "HEAD" or status in _BODILESS_STATUS or status < 200:
            body = b""
            end = True
        elif length is None:
            if request.http11:
                self._chunked = True
                lines.append(_CHUNKED)
            else:
                self._keep = False  # the end of the body is the end of the connection
        if not self._keep:
            lines.append(_CLOSE)
        elif not request.http11:
            lines.append(_KEEP_ALIVE)
        if self._chunked:
            chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            body = chunk + _LAST_CHUNK if end else chunk
        self._done = end
        lines.append(b"")  # the blank line that ends the head
        lines.append(body)
        if end:
            self._write_soon(b"\r\n".join(lines))  # a whole reply: see proxy/outbox.py
        else:
            self._write(b"\r\n".join(lines))

    def send_body(self, chunk: bytes) -> None:
        """More body bytes, after send_head; then check `writing_paused`."""
        if not chunk or self._done:
            return  # an empty chunk would end a chunked body; a HEAD reply has none
        if self._chunked:
            self._write_all((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            self._write(chunk)

    def end_body(self, last: bytes = b"") -> None:
        """The last body bytes: the response is complete."""
        if self._done:
            return  # a HEAD, 204 or 304 reply was complete with its head
        self._done = True
        if self._chunked:
            if last:
                self._write_all((b"%x\r\n" % len(last), last, b"\r\n" + _LAST_CHUNK))
            else:
                self._write(_LAST_CHUNK)
        elif last:
            self._write(last)

    @property
    def writing_paused(self) -> bool:
        """The client reads slower than we write: await drain() before writing more."""
        return self._writing_paused

    async def drain(self) -> None:
        if self._writing_paused and not self._lost:
            self._write_waiter = self._loop.create_future()
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None
        if self._lost:
            raise ConnectionResetError(_GONE)

    def close(self) -> None:
        """End the connection once what was written has gone: for a reply cut short."""
        self._keep = False
        self._close()

    def _live_transport(self) -> asyncio.Transport:
        """The transport, still open; ConnectionResetError once the client has gone."""
        transport = self._transport
        if self._lost or transport is None or transport.is_closing():
            raise ConnectionResetError(_GONE)
        return transport

    def _write(self, data: bytes) -> None:
        transport = self._live_transport()
        if self._held:
            self.flush()
        transport.write(data)

    def _write_all(self, parts: tuple[bytes, ...]) -> None:
        transport = self._live_transport()
        if self._held:
            self.flush()
        transport.writelines(parts)  # no copy of a large chunk just to frame it

    def _write_soon(self, data: bytes) -> None:
        """Write `data` at the end of the loop's turn, with the other connections' replies."""
        self._live_transport()
        if not self._held:
            self._server.outbox.hold(self)
        self._held += data

    def flush(self) -> None:
        """Write what _write_soon held (the outbox calls this)."""
        data, self._held = self._held, b""
        transport = self._transport
        if data and not self._lost and transport is not None and not transport.is_closing():
            transport.write(data)

    def _close(self) -> None:
        if self._transport is not None:
            if self._held:
                self.flush()
            self._transport.close()

    # Used by the server

    @property
    def idle(self) -> bool:
        """No request in progress, none with its body arriving (a head may be partly here)."""
        return self._current is None and self._parsing is None

    def expire(self) -> None:
        """Idle for too long (keepalive_timeout, or a head that never ends): close."""
        self._close()

    def shutdown(self) -> None:
        """Stop once what the client has sent is answered: the request in progress, those
        pipelined behind it, one partly here (now, if there is none)."""
        self.draining = True
        if self._current is None:
            if not self._more_behind():
                self._close()
        elif not self._head_sent and not self._more_behind():
            self._keep = False  # its response says Connection: close

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def stalled(self, now: float) -> float:
        """For how long (seconds) bytes have waited for the client without it taking any; 0 if
        none wait. Sampled by the server's sweep rather than counted on every write: a buffer
        whose size changed since the last sweep counts as progress (once writing pauses, only
        the client can change it)."""
        transport = self._transport
        unsent = 0 if transport is None or self._lost else transport.get_write_buffer_size()
        if unsent != self._unsent:
            self._unsent, self._unsent_since = unsent, now
        return now - self._unsent_since if unsent else 0.0


class Http1Server:
    """Listens on one address and serves each connection with an HttpConnection."""

    def __init__(
        self,
        handler: Handler,
        *,
        whole_body_limit: int,
        keepalive_timeout: float = 75.0,
        send_timeout: float = 60.0,
        body_timeout: float = 60.0,
    ) -> None:
        self.handler = handler
        # Bodies with a Content-Length up to this are read whole before the handler starts.
        self.whole_body_limit = whole_body_limit
        self.keepalive_timeout = keepalive_timeout  # idle connections close after this (seconds)
        # A client that takes none of our bytes for this long is cut off (nginx's send_timeout):
        # else its handler waits in drain() for ever, holding the upstream request.
        self.send_timeout = send_timeout
        # A client that sends no byte of a request body for this long gets 408 (nginx's
        # client_body_timeout): else it holds an upstream connection for as long as it likes.
        self.body_timeout = body_timeout
        self.connections: set[HttpConnection] = set()
        self.outbox = Outbox()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._all_gone: asyncio.Future[None] | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Bind and serve. `reuse_port` (SO_REUSEPORT) lets several processes share the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self, loop),
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        self._sweeper = loop.create_task(self._sweep(), name="http1-keepalive")

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port) of the first listening socket."""
        assert self._server is not None
        # getattr: typeshed says a tuple, which the compiled build (setup.py) would check,
        # but uvloop's servers hold their sockets in a list.
        sockets = getattr(self._server, "sockets")  # noqa: B009
        host, port = sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, close idle connections, let requests in flight finish for up to
        `drain_timeout` seconds, then cut the rest (their handlers are cancelled)."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection.shutdown()
        if not await self._all_closed(drain_timeout):
            for connection in list(self.connections):
                connection.abort()
            await self._all_closed(5.0)
        if self._sweeper is not None:  # it kept timing bodies out while the rest drained
            self._sweeper.cancel()
        await self._server.wait_closed()
        self._server = None

    def forget(self, connection: HttpConnection) -> None:
        """A connection is closed and its handler done."""
        self.connections.discard(connection)
        if not self.connections and self._all_gone is not None and not self._all_gone.done():
            self._all_gone.set_result(None)

    async def _all_closed(self, seconds: float) -> bool:
        if not self.connections:
            return True
        self._all_gone = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._all_gone, seconds)
        except TimeoutError:
            return False
        return True

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for longer than keepalive_timeout (a head that
        takes as long too), answer 408 to those whose body has not moved for body_timeout, and
        cut those whose client has taken no bytes for send_timeout. A sweep instead of timers
        per request: a request costs a clock read, not a timer to set and cancel. A timeout
        fires up to a quarter late."""
        timeouts = (self.keepalive_timeout, self.send_timeout, self.body_timeout)
        interval = max(min(timeouts) / 8, 0.01)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            deadline = now - self.keepalive_timeout
            for connection in list(self.connections):
                if connection.idle and connection.idle_since < deadline:
                    connection.expire()
                elif connection.body_stalled(now) > self.body_timeout:
                    connection.body_timed_out()
                # Aborted, not closed: close() would wait for the buffer to drain, which it won't.
                # Losing the connection cancels its handler, as when the client hangs up.
                if connection.stalled(now) > self.send_timeout:
                    connection.abort()
