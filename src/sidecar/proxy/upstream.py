"""The pooled keep-alive client to the model server, and what its failures mean to the client."""

from __future__ import annotations

import asyncio

import aiohttp

# Headers aiohttp's client would add on its own; the upstream must see the client's, not ours.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def open_session(*, connect_timeout: float, read_timeout: float) -> aiohttp.ClientSession:
    """A keep-alive pool that passes bodies through untouched (no decompression, no cookies).

    `read_timeout` bounds each wait for upstream bytes (the headers, then each body chunk), so a
    stream that keeps producing may run longer than it, but a silent upstream is cut off.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=False),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        ),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_NO_AUTO_HEADERS,
        raise_for_status=False,
    )


class UpstreamError(Exception):
    """The upstream failed in a way the client must hear about from the proxy itself."""

    error_type = "upstream_error"
    status = 502
    reason = "upstream error"


class UpstreamUnreachable(UpstreamError, ConnectionError):
    error_type = "upstream_unreachable"
    status = 502
    reason = "upstream unreachable"


class UpstreamTimeout(UpstreamError, TimeoutError):
    error_type = "upstream_timeout"
    status = 504
    reason = "upstream timed out"


class UpstreamReset(UpstreamError, ConnectionResetError):
    error_type = "upstream_reset"
    status = 502
    reason = "upstream closed the connection"


def classify(exc: BaseException) -> UpstreamError:
    """Map an aiohttp client failure onto the proxy's error family (order matters: subclasses)."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return UpstreamTimeout(str(exc) or "no answer within the upstream timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnreachable(str(exc))
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return UpstreamReset(str(exc) or "connection closed before the response was complete")
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError):
        return UpstreamReset(str(exc))
    return UpstreamError(str(exc) or type(exc).__name__)
