"""The exchange record: the one thing that crosses from the proxy to the recorders.

The proxy knows nothing of models and the recorders know nothing of HTTP; this module imports
nothing of ours so that both can depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

import msgspec


class Exchange(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """What happened to one request, built after the reply went out.

    Bodies are None unless the route asked for them and they fit the parse limit (`truncated` says
    a body was wanted but too large). `status` is what the client got (499 if it left before any
    answer); `error` names what the proxy itself saw go wrong (upstream_timeout,
    upstream_unreachable, upstream_reset, client_disconnect). A gRPC call has the HTTP status
    of the same meaning and `grpc_status`, its own status name. `arrivals` says when the captured
    response body arrived: (bytes so far, seconds since the request came in) per piece, so that
    streamed replies (server-sent events) can be timed after the fact.
    """

    method: str
    path: str
    status: int
    request_id: str
    request_headers: Mapping[str, str]
    response_headers: Mapping[str, str]
    request_body: bytes | None
    response_body: bytes | None
    request_size: int
    response_size: int
    upstream_seconds: float
    total_seconds: float
    error: str | None = None
    grpc_status: str | None = None  # a gRPC call's status name (OK, UNAVAILABLE, ...)
    trace_id: str | None = None  # from the request's W3C traceparent: the latency exemplar
    truncated: bool = False
    arrivals: Sequence[tuple[int, float]] = ()


class RouteTicket(Protocol):
    """What the observer decides when a request arrives, handed back to it at the end."""

    @property
    def capture_bodies(self) -> bool: ...

    @property
    def inject_usage(self) -> bool:
        """Ask a streamed OpenAI-style call for token usage, and hide it from the client."""
        ...


TicketT = TypeVar("TicketT", bound=RouteTicket)


class ExchangeObserver(Protocol[TicketT]):
    """Told of every request: once when it starts, once after its reply went out."""

    def begin(self, method: str, path: str) -> TicketT: ...

    def end(self, ticket: TicketT, exchange: Exchange) -> None: ...


class CallObserver(Protocol[TicketT]):
    """The same observer, told of gRPC calls: their paths name the method, and the model is
    named by the message (when the relay could read it), not by the path."""

    def begin_call(
        self, path: str, model_name: str | None, model_version: str | None
    ) -> TicketT: ...

    def end(self, ticket: TicketT, exchange: Exchange) -> None: ...
