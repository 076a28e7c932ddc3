"""Turning one side of an exchange into a JSON value, or deciding that it is not ours to parse.

A body is parsed only when it says it is JSON or says nothing (TorchServe sends no Content-Type on
200). CSV, images, Triton's binary tensors and encodings we cannot undo are skipped without an
error: they are valid traffic, just not JSON.
"""

from __future__ import annotations

import functools
import json
import zlib
from typing import Any, Final

import msgspec
import orjson

from sidecar.extract import sliced
from sidecar.extract.errors import BodyError
from sidecar.extract.types import Message

__all__ = ["MAX_INFLATED_BYTES", "SKIPPED", "Decoded", "Parsed", "decode"]

# A compressed body is inflated at most to this size, so a small gzip bomb cannot take the process's
# memory in the post-reply path.
MAX_INFLATED_BYTES: Final = 64 * 1024 * 1024

# Triton's binary tensor extension: the body is a JSON header of this many bytes, then raw tensors.
_BINARY_HEADER: Final = "inference-header-content-length"
# zlib window bits per Content-Encoding: gzip framing; deflate is zlib-wrapped per RFC 9110, but
# some servers send it raw, so both are tried.
_WBITS: Final = {"gzip": (31,), "x-gzip": (31,), "deflate": (15, -15)}


class _Skipped:
    """Marker for a body that is empty or not JSON by its own headers; nothing to extract."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIPPED"


SKIPPED: Final = _Skipped()


class Parsed(msgspec.Struct, frozen=True, gc=False):  # a Struct: made per body, 6x cheaper
    """A parsed JSON body and the (decompressed) bytes it came from."""

    value: Any
    raw: bytes

    @property
    def may_hold_booleans(self) -> bool:
        """Whether `true`/`false` occur anywhere in the body: a byte scan, no walk over the value.

        numpy reads JSON booleans as 1.0/0.0, so a table built in one vectorised step is exact only
        when the body holds no boolean at all (or the 0/1 cells are checked one by one).
        """
        return sliced.contains(self.raw, b"true") or sliced.contains(self.raw, b"false")


Decoded = Parsed | _Skipped
"""What a body decoder returns: the parsed body, or SKIPPED."""


def decode(message: Message) -> Decoded:
    """The parsed JSON body, SKIPPED if there is nothing to parse; BodyError if it is not JSON."""
    headers = message.headers
    content_type = headers.get("content-type")
    if content_type is not None and content_type.startswith("application/grpc"):
        return _from_grpc(message.body, content_type)
    if content_type is not None and not _is_json_type(content_type):
        return SKIPPED
    if _BINARY_HEADER in headers:
        return SKIPPED
    encoding = headers.get("content-encoding")
    body = message.body if encoding is None else _inflate(message.body, encoding)
    if body is None or not body or body.isspace():
        return SKIPPED
    try:
        return Parsed(sliced.loads(body), body)  # orjson's, a slice at a time if large
    except orjson.JSONDecodeError:
        pass
    # orjson rejects NaN/Infinity literals and numbers beyond a double, which Python's json reads
    # as nan/inf; the slow parser runs only for bodies that orjson refused.
    try:
        return Parsed(json.loads(body), body)
    except (ValueError, RecursionError) as exc:
        msg = f"body is not JSON: {exc}"
        raise BodyError(msg) from None


def _from_grpc(body: bytes, content_type: str) -> Decoded:
    """A ModelInfer message from the gRPC relay, as the JSON body of the same call over HTTP."""
    # Here, not at the top: protobuf stays out of a sidecar that serves no gRPC (~4 MB).
    from sidecar.extract import oip_grpc

    found = oip_grpc.document(body, content_type)
    if found is None:  # a method that extraction does not read
        return SKIPPED
    # `raw` only answers may_hold_booleans here: the document has bools where a BOOL tensor is.
    return Parsed(found, b"true" if oip_grpc.holds_booleans(found) else b"")


@functools.lru_cache(maxsize=64)  # a server sends one or two distinct values
def _is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("", "application/json", "text/json") or media.endswith("+json")


def _inflate(body: bytes, encoding: str) -> bytes | None:
    """The body with its Content-Encoding undone; None for encodings we do not decode (br, zstd).

    A body that does not inflate is returned as it is: an HTTP client may already have decoded it
    while the header stayed, and if it really is broken, JSON parsing reports it.
    """
    coding = encoding.strip().lower()
    if coding == "identity":
        return body
    if coding not in _WBITS:
        return None
    for wbits in _WBITS[coding]:
        inflated = _bounded_inflate(body, wbits)
        if inflated is not None:
            return inflated
    return body


def _bounded_inflate(body: bytes, wbits: int) -> bytes | None:
    """The inflated body, None if it is not a complete stream of this kind; BodyError if too big."""
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, MAX_INFLATED_BYTES)
    except zlib.error:
        return None
    if inflater.unconsumed_tail:
        msg = f"body inflates to more than {MAX_INFLATED_BYTES} bytes"
        raise BodyError(msg)
    return out if inflater.eof else None
