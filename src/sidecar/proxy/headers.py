"""Which headers cross the hop, and the request id that rides along with them.

Headers stay raw bytes on the way through, so that whatever the client or the model server sent
(case, order, repeats, odd bytes) is what the other side gets.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar, overload

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


# Lower-case names payload extraction asks an exchange's headers for (sidecar.extract.body): scan()
# notes them on its way, so that a HeaderView answers for them without a pass of its own.
_READ_BY_EXTRACTION = frozenset(
    {b"content-type", b"content-encoding", b"inference-header-content-length"}
)
# Lower-case names the proxy acts on, or notes. Every other header passes without a second look.
# traceparent (W3C Trace Context): its trace id becomes the latency histograms' exemplar.
NOTED = (
    HOP_BY_HOP
    | {b"content-length", b"expect", b"host", _REQUEST_ID, b"traceparent"}
    | _READ_BY_EXTRACTION
)
_NOT_NAMES = HOP_BY_HOP | {b"close", b""}  # Connection tokens that drop nothing more
# Noted with every value, joined: Connection and Transfer-Encoding are lists; Host is not, and a
# comma in what is noted of it says that it came more than once.
_LISTS = frozenset({b"connection", b"transfer-encoding", b"host"})
# What frames a message or says where it goes. A Connection header that names one of them would
# have the proxy drop it, and forward a message framed differently from the one it read (a body
# without its length is read by the next hop as the start of another request): refused.
_UNDROPPABLE = frozenset({b"content-length", b"host"})


class AmbiguousFraming(ValueError):
    """A message whose headers leave its framing or destination open to two readings."""


def scan(raw: Iterable[tuple[bytes, bytes]]) -> tuple[RawHeaders, dict[bytes, bytes]]:
    """One pass over a message's headers: those to forward (all but the hop-by-hop ones and
    those Connection names, in order), and the value of each NOTED one by lower-case name (the
    first; the values of Connection, Transfer-Encoding and Host are joined, see _LISTS). Names
    that Connection drops are not noted either: for the next hop they were never sent.

    Raises AmbiguousFraming when Connection names Content-Length or Host."""
    forward: RawHeaders = []
    noted: dict[bytes, bytes] = {}
    for header in raw:
        lowered = header[0].lower()
        if lowered in NOTED:
            if lowered not in noted:
                noted[lowered] = header[1]
            elif lowered in _LISTS:
                noted[lowered] += b"," + header[1]
            if lowered in HOP_BY_HOP:
                continue
        forward.append(header)
    connection = noted.get(b"connection")
    if connection is not None and connection.lower() not in _NOT_NAMES:  # not just keep-alive
        # Header names listed in Connection are hop-by-hop for this message too.
        named = {token.strip().lower() for token in connection.split(b",")} - _NOT_NAMES
        if named & _UNDROPPABLE:
            msg = f"Connection names {b', '.join(sorted(named & _UNDROPPABLE)).decode()}"
            raise AmbiguousFraming(msg)
        if named:
            forward = [header for header in forward if header[0].lower() not in named]
            for name in named & noted.keys():
                del noted[name]
    return forward, noted


def relayable_codings(codings: bytes) -> bool:
    """Whether the transfer codings (every Transfer-Encoding value, joined) are at most
    `chunked`, the one coding the proxy takes off and puts back, and `identity` (none, in
    RFC 2616's words). Any other, such as gzip under the chunks, would be lost on the way."""
    named = [coding.strip().lower() for coding in codings.split(b",")]
    return [coding for coding in named if coding != b"identity"] in ([], [b"chunked"])


# (name, value) -> b"name: value". A head is built as b"\r\n".join([start line,
# *map(field_line, headers), b"", body]): one allocation, the per-header work in C.
field_line = b": ".join


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def parse_length(value: bytes | None) -> int | None:
    """A Content-Length value as a number, or None when absent or not a number."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


_T = TypeVar("_T")
# The names extraction asks for, as the keys scan() notes them under.
_LOWERED = {name.decode(): name for name in _READ_BY_EXTRACTION}


class HeaderView(Mapping[str, str]):
    """Raw headers as a case-insensitive `str` mapping (names lower-cased), decoded (latin-1) on
    use; of a repeated header, the first value.

    The exchange record offers headers by name, but only payload extraction reads them, and it
    asks for the same three names of every body: those come from what scan() noted on the proxy
    path, when the caller passes it; any other name from the raw names, lower-cased once.
    Decoding every header into a dict up front cost more than that; iterating builds it, once.
    """

    __slots__ = ("_decoded", "_names", "_noted", "_raw")

    def __init__(self, raw: RawHeaders, noted: Mapping[bytes, bytes] | None = None) -> None:
        self._raw = raw
        self._noted = noted  # what scan() noted of these headers, if the caller has it
        self._names: list[bytes] | None = None  # lower-cased, in order, made on the first scan
        self._decoded: dict[str, str] | None = None

    def _headers(self) -> dict[str, str]:
        if self._decoded is None:
            # Reversed, so that the first of repeated headers is the one kept.
            self._decoded = {
                name.lower().decode("latin-1"): value.decode("latin-1")
                for name, value in reversed(self._raw)
            }
        return self._decoded

    def _find(self, name: str) -> bytes | None:
        """The raw value of the first header called `name` (any case), or None, from the raw
        names (get() answers extraction's names from what scan() noted, when it has that)."""
        try:
            wanted = name.encode("latin-1").lower()  # as the names were: bytes.lower()
        except UnicodeEncodeError:
            return None  # no raw name decodes to it
        names = self._names
        if names is None:
            names = self._names = [field.lower() for field, _ in self._raw]
        if wanted not in names:  # a scan in C
            return None
        return self._raw[names.index(wanted)][1]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, /, default: str | _T) -> str | _T: ...
    def get(self, name: str, /, default: object = None) -> object:
        # Mapping.get would go through __getitem__ and a KeyError for every absent header. The
        # names extraction asks for come from `noted` here, without a call.
        wanted = _LOWERED.get(name)
        if wanted is not None and self._noted is not None:
            value = self._noted.get(wanted)
        else:
            value = self._find(name)
        return default if value is None else value.decode("latin-1")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers())

    def __len__(self) -> int:
        return len(self._headers())

    def __repr__(self) -> str:
        return f"HeaderView({self._raw!r})"


def trace_id(traceparent: bytes | None) -> str | None:
    """The trace id of a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`), None unless valid:
    a version byte other than ff, and a trace id of 32 lower-case hex digits, not all zero."""
    if traceparent is None or len(traceparent) < 55 or traceparent[2:3] != b"-":
        return None
    version, found = traceparent[:2], traceparent[3:35]
    if version == b"ff" or traceparent[35:36] != b"-" or found == b"0" * 32:
        return None
    if not all(c in b"0123456789abcdef" for c in version + found):
        return None
    return found.decode("ascii")
