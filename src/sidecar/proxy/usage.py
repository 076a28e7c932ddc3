"""`inject_usage`: ask a streaming LLM server for token usage, and hide that answer from a client
that did not ask for it.

This is the one place where the relay changes bytes, and it is off unless a route turns it on.
The request gains `"stream_options": {"include_usage": true}`; the reply loses the one event that
option adds (`"choices": []` with the `usage`), so the client sees the stream it asked for while
the sidecar's copy keeps the usage. Every other byte of the reply passes unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, NamedTuple

import orjson

from sidecar.extract.sse import Event, EventSplitter
from sidecar.proxy.headers import RawHeaders

__all__ = ["UsageFilter", "UsageRequest", "ask_for_usage", "usage_filter"]

_SPLICE: Final = b'"stream_options":{"include_usage":true},'
# Held bytes of one unfinished event beyond which the filter gives up and passes everything: a
# stream without blank lines is not one we can edit, and must not pile up here.
_MAX_HELD: Final = 1024 * 1024
# An event can only be the usage event if it holds an empty choices array.
_EMPTY_CHOICES: Final = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class UsageRequest(NamedTuple):
    """The request to send: its headers (without Content-Length when the body changed, so that the
    pool sets the new one), its body, and whether it was rewritten."""

    headers: RawHeaders
    body: bytes
    rewritten: bool


def ask_for_usage(headers: RawHeaders, body: bytes) -> UsageRequest:
    """The request with `stream_options.include_usage` set, or as it came.

    Only a JSON object asking for `"stream": true` and not already asking for usage is rewritten;
    anything else (not JSON, compressed, not a stream) goes unchanged. When the request has no
    `stream_options`, the key is spliced in after the opening brace and every other byte stays.

    >>> ask_for_usage([], b'{"stream": true}').body
    b'{"stream_options":{"include_usage":true},"stream": true}'
    """
    rewritten = _with_usage(headers, body)
    if rewritten is None:
        return UsageRequest(headers, body, False)
    kept = [(name, value) for name, value in headers if name.lower() != b"content-length"]
    return UsageRequest(kept, rewritten, True)


def _with_usage(headers: RawHeaders, body: bytes) -> bytes | None:
    if any(name.lower() == b"content-encoding" for name, _ in headers):
        return None
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(request, dict) or request.get("stream") is not True:
        return None
    if "stream_options" not in request:
        brace = body.index(b"{") + 1
        return body[:brace] + _SPLICE + body[brace:]
    options = request["stream_options"]
    if not isinstance(options, dict) or options.get("include_usage"):
        return None  # the client asked for usage itself, or sent something we do not know
    if options.get("continuous_usage_stats"):
        return None  # usage in every chunk (vLLM): not ours to hide
    request["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(request)


def usage_filter(
    status: int, headers: Mapping[str, str], content_length: int | None, rewritten: bool
) -> UsageFilter | None:
    """A filter for the reply to a rewritten request; None when the request was not rewritten or
    the reply is not an event stream we can change (an error, JSON, or a stream with a
    Content-Length that a removed event would break)."""
    if not rewritten or not 200 <= status < 300 or content_length is not None:
        return None
    content_type = headers.get("Content-Type", "")
    if content_type.split(";", 1)[0].strip().lower() != "text/event-stream":
        return None
    return UsageFilter()


class UsageFilter:
    """Removes the usage event from a stream, byte for byte otherwise.

    Complete events go out as soon as their blank line arrives; only the bytes of an event still
    in progress are held back (a client cannot act on half an event anyway). After the usage
    event has gone, the rest passes through without being looked at.
    """

    __slots__ = ("_done", "_held", "_held_at", "_splitter")

    def __init__(self) -> None:
        self._splitter = EventSplitter()
        self._held = b""  # received, not yet sent
        self._held_at = 0  # stream offset of _held[0]
        self._done = False

    def __call__(self, chunk: bytes, at_eof: bool) -> bytes:
        """The bytes to send for `chunk`; at the end of the stream, whatever is still held."""
        if self._done:
            return chunk
        held = self._held + chunk if self._held else chunk
        events = self._splitter.feed(chunk, final=at_eof)
        usage = [event for event in events if _is_usage(event.data)]
        if usage:
            self._done = True
        if self._done or at_eof or (not events and len(held) > _MAX_HELD):
            self._done, self._held = True, b""
            return _without(held, self._held_at, usage)
        if not events:
            self._held = held
            return b""
        complete = events[-1].end - self._held_at
        self._held, self._held_at = held[complete:], events[-1].end
        return held[:complete] if complete < len(held) else held


def _without(data: bytes, offset: int, events: list[Event]) -> bytes:
    """`data` (starting at stream offset `offset`) less the bytes of `events`."""
    if not events:
        return data
    kept, cursor = [], 0
    for event in events:
        kept.append(data[cursor : event.start - offset])
        cursor = event.end - offset
    kept.append(data[cursor:])
    return b"".join(kept)


def _is_usage(data: bytes | None) -> bool:
    """Whether an event's data is a chunk with no choices and a usage object."""
    if data is None or _EMPTY_CHOICES.search(data) is None:
        return False
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(value, dict)
        and value.get("choices") == []
        and isinstance(value.get("usage"), dict)
    )
