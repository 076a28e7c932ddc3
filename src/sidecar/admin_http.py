"""A small router for the admin port, on the proxy port's own HTTP/1.1 server (proxy/http1.py).

The admin port answers a few exact paths a few times a minute: Prometheus, the kubelet's probes,
labels posted to /feedback. aiohttp's web framework did it for about 10 MB of RSS in every
serving process (docs/deploy.md, Resources), where Http1Server is loaded anyway for the proxy
port. A route is a method and an exact path; its handler returns a Reply, or an awaitable of
one. HEAD is answered wherever GET is, without the body; an unknown path gets 404, a known path
with another method 405, both with aiohttp's plain-text bodies.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, NamedTuple

from sidecar.proxy.headers import parse_length
from sidecar.proxy.http1 import BodyReader, HttpConnection, Request

__all__ = [
    "BodyTooLarge",
    "BodyUndecodable",
    "Reply",
    "Route",
    "Router",
    "gzipped",
    "header",
    "json_reply",
    "read_body",
]


Fields = tuple[tuple[bytes, bytes], ...]


class Reply(NamedTuple):
    """A whole answer: status, body, its media type, and any other headers."""

    status: int
    body: bytes
    content_type: bytes
    headers: Fields = ()


Route = Callable[[Request, HttpConnection], Reply | Awaitable[Reply]]
"""Answers one method and path: a Reply at once, or an awaitable of one (run in a task)."""

_JSON = b"application/json; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"


def json_reply(value: Any, status: int = 200, headers: Fields = ()) -> Reply:
    """`value` as JSON, encoded as aiohttp's json_response does (json.dumps)."""
    return Reply(status, json.dumps(value).encode(), _JSON, headers)


def _text_reply(status: int, headers: Fields = ()) -> Reply:
    return Reply(status, f"{status}: {HTTPStatus(status).phrase}".encode(), _TEXT, headers)


def header(request: Request, name: bytes) -> str:
    """Every value of the header `name` (lower case), joined with commas; "" if none came."""
    values = [value for key, value in request.headers if key.lower() == name]
    return b",".join(values).decode("latin-1")


# Several times faster than gzip's default (9) for about a third more bytes: the admin port
# shares the proxy's event loop, and a scrape's size is nobody's bottleneck.
GZIP_LEVEL = 1


def gzipped(reply: Reply, accept_encoding: str) -> Reply:
    """`reply`, its body compressed with gzip if `accept_encoding` (the request's
    Accept-Encoding) takes gzip; either way saying that the answer varies with that header."""
    vary = (b"Vary", b"Accept-Encoding")
    if not _takes_gzip(accept_encoding):
        return reply._replace(headers=(*reply.headers, vary))
    body = gzip.compress(reply.body, compresslevel=GZIP_LEVEL)
    return reply._replace(body=body, headers=(*reply.headers, (b"Content-Encoding", b"gzip"), vary))


def _takes_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding value lists gzip, and not with q=0 (RFC 9110, 12.5.3)."""
    for item in accept_encoding.split(","):
        coding, *parameters = (part.strip().lower() for part in item.split(";"))
        if coding in ("gzip", "x-gzip"):
            return not any(_is_zero_weight(parameter) for parameter in parameters)
    return False


def _is_zero_weight(parameter: str) -> bool:
    name, _, value = parameter.partition("=")
    try:
        return name.strip() == "q" and float(value) == 0
    except ValueError:
        return False


class BodyTooLarge(ValueError):
    """A request body over the limit read_body was given."""


class BodyUndecodable(ValueError):
    """A request body that its Content-Encoding (gzip, deflate) does not describe."""


# Content codings a body may come in, as aiohttp's server took them: inflated before use.
_INFLATED = frozenset({b"gzip", b"x-gzip", b"deflate"})


async def read_body(request: Request, connection: HttpConnection, limit: int) -> bytes:
    """The whole request body, at most `limit` bytes, else BodyTooLarge: refused on its
    Content-Length before a byte is read, or as soon as more than `limit` bytes have come.
    A gzip or deflate body is inflated, to at most `limit` bytes as well."""
    body = request.body
    if isinstance(body, BodyReader):
        length = parse_length(request.noted.get(b"content-length"))
        if length is not None and length > limit:
            raise BodyTooLarge
        connection.send_continue()  # a client holding the body back for it (curl does > 1 MiB)
        parts, size = [], 0
        async for chunk in body:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            parts.append(chunk)
        body = b"".join(parts)
    body = body or b""
    if len(body) > limit:
        raise BodyTooLarge
    coding = request.noted.get(b"content-encoding", b"").strip().lower()
    return _inflate(body, limit) if coding in _INFLATED else body


def _inflate(body: bytes, limit: int) -> bytes:
    """A gzip or zlib stream, inflated to at most `limit` bytes: a small body can stand for a
    huge one, so the output is bounded, not the input alone."""
    inflater = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)  # either header, detected
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        msg = f"the body is not valid gzip or deflate: {exc}"
        raise BodyUndecodable(msg) from None
    if len(data) > limit:
        raise BodyTooLarge
    if not inflater.eof:
        msg = "the body is not valid gzip or deflate: it ends early"
        raise BodyUndecodable(msg)
    return data


class Router:
    """An http1.Handler that dispatches on the exact path, then the method."""

    def __init__(self) -> None:
        self._paths: dict[str, dict[str, Route]] = {}

    def add(self, method: str, path: str, route: Route) -> None:
        methods = self._paths.setdefault(path, {})
        methods[method] = route
        if method == "GET":
            methods["HEAD"] = route

    def __call__(self, request: Request, connection: HttpConnection) -> Awaitable[None] | None:
        methods = self._paths.get(request.path)
        if methods is None:
            answer: Reply | Awaitable[Reply] = _text_reply(404)
        elif (route := methods.get(request.method)) is None:
            allow = ",".join(sorted(methods)).encode()
            answer = _text_reply(405, ((b"Allow", allow),))
        else:
            answer = route(request, connection)
        if isinstance(answer, Reply):
            _send(connection, answer)
            connection.finished()
            return None
        return _send_later(connection, answer)


async def _send_later(connection: HttpConnection, pending: Awaitable[Reply]) -> None:
    _send(connection, await pending)  # the connection calls finished() once this returns


def _send(connection: HttpConnection, reply: Reply) -> None:
    status, body, content_type, extra = reply
    headers = [(b"Content-Type", content_type), (b"Content-Length", b"%d" % len(body)), *extra]
    reason = HTTPStatus(status).phrase.encode()
    connection.send_head(status, reason, headers, len(body), body, end=True)
