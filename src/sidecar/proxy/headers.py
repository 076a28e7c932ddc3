"""Which headers cross the hop, and the request id that rides along with them."""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from multidict import CIMultiDict

# RFC 9110 section 7.6.1: meaningful for one connection only, so never forwarded. Proxy-* are
# credentials and options meant for a proxy, which is us. Everything else passes unchanged.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

REQUEST_ID = "X-Request-ID"


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Header names listed in Connection are hop-by-hop for this message too."""
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(token.strip().lower() for token in value.split(","))
    return frozenset(tokens)


def end_to_end(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """Keep every header but the hop-by-hop ones, in order, with repeats and original case."""
    pairs = list(headers)
    dropped = HOP_BY_HOP | _connection_tokens(pairs)
    return CIMultiDict((name, value) for name, value in pairs if name.lower() not in dropped)


def decode_raw(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Raw header bytes as str pairs; latin-1 maps every byte, so nothing is lost either way."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]


def ensure_request_id(headers: CIMultiDict[str]) -> str:
    """Keep the client's X-Request-ID, or add a fresh one; return it."""
    request_id = headers.get(REQUEST_ID)
    if not request_id:
        request_id = uuid4().hex
        headers[REQUEST_ID] = request_id
    return request_id
