"""What upstream failures mean to the client: the proxy's error family."""

from __future__ import annotations


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


class UpstreamInvalid(UpstreamError):
    """A reply the proxy cannot relay as it is: unparseable, framed two ways, or in a transfer
    coding other than chunked (which the relay would take off with the chunks)."""

    error_type = "upstream_invalid"
    status = 502
    reason = "upstream sent an invalid response"
