"""Which headers cross the hop, and the request id that rides along with them.

Headers stay raw bytes on the way through, so that whatever the client or the model server sent
(case, order, repeats, odd bytes) is what the other side gets.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

# RFC 9110 section 7.6.1: meaningful for one connection only, so never forwarded. Proxy-* are
# credentials and options meant for a proxy, which is us. Everything else passes unchanged.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

REQUEST_ID = "X-Request-ID"
_REQUEST_ID = b"x-request-id"

RawHeaders = list[tuple[bytes, bytes]]

# Request ids: 16 random hex digits per process, then a counter. As unique as uuid4 for our use
# (join feedback to predictions), without a getrandom() system call on every request.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def _new_id_prefix() -> None:
    """A forked worker must not repeat its parent's ids."""
    global _ID_PREFIX, _ID_COUNTER  # per-process state, reset once per fork
    _ID_PREFIX = os.urandom(8).hex()
    _ID_COUNTER = itertools.count()


os.register_at_fork(after_in_child=_new_id_prefix)


def end_to_end(raw: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """Every header but the hop-by-hop ones (and those Connection names), in order."""
    pairs = list(raw)
    dropped = HOP_BY_HOP
    for name, value in pairs:
        if name.lower() == b"connection":
            # Header names listed in Connection are hop-by-hop for this message too.
            dropped = dropped | {token.strip().lower() for token in value.split(b",")}
    return [(name, value) for name, value in pairs if name.lower() not in dropped]


def find(headers: RawHeaders, name: bytes) -> bytes | None:
    """The first value of a header (name given in lower case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def ensure_request_id(headers: RawHeaders) -> str:
    """Keep the client's X-Request-ID, or add a fresh one; return it."""
    found = find(headers, _REQUEST_ID)
    if found:
        return found.decode("latin-1")
    request_id = f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"
    headers.append((REQUEST_ID.encode(), request_id.encode()))
    return request_id
