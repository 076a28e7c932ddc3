"""One HTTP endpoint, POSTed to over one keep-alive connection, blocking: for a thread of its own
(the CloudEvents sink's).

Not http.client: it costs about 140 µs of CPU per request (headers put one call at a time, the
answer parsed by the email package), all of it holding the GIL the event loop needs. A request
written in one piece and an answer parsed by llhttp (httptools, as proxy/pool.py does) cost about
25 µs (benchmarked against a local aiohttp receiver, 5,000 requests).
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

import httptools

__all__ = ["Endpoint", "Unanswered"]

_READ_SIZE = 65536


class Unanswered(ConnectionResetError):
    """The connection failed before any byte of the answer came: refused, reset or closed."""


class _Answer:
    """An answer as llhttp parses it, from the bytes given to `parser`."""

    __slots__ = ("complete", "head_complete", "keep_alive", "parser", "status")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head_complete = False
        self.complete = False
        self.status = 0
        self.keep_alive = False

    def on_headers_complete(self) -> None:
        # Read here: once the message is complete, llhttp has reset them for the next one.
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.head_complete = True

    def on_message_complete(self) -> None:
        self.complete = True


class Endpoint:
    """POST to `url`; connects on the first request, and again after a failure or an answer
    that closes the connection. `timeout` bounds the connect and each read or write."""

    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        self._address = (parts.hostname or "", parts.port or (443 if secure else 80))
        self._tls = ssl.create_default_context() if secure else None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rpartition("@")[2]  # as written, [IPv6] brackets and port included
        self._head = f"POST {target} HTTP/1.1\r\nHost: {host}\r\n".encode("ascii")
        self._timeout = timeout
        self._sock: socket.socket | None = None

    def post(self, headers: bytes, body: bytes) -> int:
        """Send one request (`headers`: header lines, each ending in CRLF; Host and
        Content-Length are added) and return the answer's status once it has come whole.
        Raises OSError (Unanswered when nothing came) or httptools.HttpParserError."""
        request = b"%s%sContent-Length: %d\r\n\r\n%s" % (self._head, headers, len(body), body)
        reused = self._sock is not None
        try:
            return self._exchange(request)
        except Unanswered:
            if not reused:
                raise
            # The receiver closed the connection while it was idle: once more on a new one.
            return self._exchange(request)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _exchange(self, request: bytes) -> int:
        sock = self._sock or self._connect()
        answer = _Answer()
        try:
            try:
                sock.sendall(request)
                data = sock.recv(_READ_SIZE)
            except ConnectionError as exc:
                raise Unanswered(str(exc)) from exc
            if not data:
                msg = "the receiver closed the connection without answering"
                raise Unanswered(msg)
            while True:
                answer.parser.feed_data(data)
                if answer.complete:
                    break
                data = sock.recv(_READ_SIZE)
                if not data and answer.head_complete:
                    break  # a body that ends with the connection: the status is what matters
                if not data:
                    msg = "the receiver closed the connection in the middle of its answer"
                    raise ConnectionResetError(msg)
        except BaseException:
            self.close()
            raise
        if not answer.complete or not answer.keep_alive:
            self.close()
        return answer.status

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self._address, timeout=self._timeout)
        try:
            # A request is one write, and the next waits for its answer: nothing to coalesce.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._address[0])
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return sock
