"""Server-sent events (`text/event-stream`), the wire format: a byte stream split into events.

The parsing rules of the WHATWG HTML standard ("Interpreting an event stream") that matter for a
proxy: a line ends in CRLF, LF or CR; a blank line ends an event; `data:` lines are joined with LF;
a line starting with `:` is a comment (keep-alives). Imports nothing of ours, so both the proxy's
usage filter and the openai extraction preset use it.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Event", "EventSplitter", "split_events"]


class Event(NamedTuple):
    """One event: where its bytes sit in the stream, and its data.

    `start` and `end` are stream offsets: `end` is just past the blank line that ended it, so
    `stream[start:end]` is the event's raw bytes. `data` is None for an event without a `data`
    field (a comment or keep-alive), which the standard says is never dispatched.
    """

    start: int
    end: int
    data: bytes | None


class EventSplitter:
    """Incremental: `feed` bytes as they arrive and get back the events they completed.

    Events come out the same wherever the bytes were cut: a CR at the very end of a chunk may be
    the first half of a CRLF, so it counts only when the next byte (or `final`) says what it is.

    >>> splitter = EventSplitter()
    >>> splitter.feed(b"data: a\\n")
    []
    >>> splitter.feed(b"\\ndata: b\\n\\n")
    [Event(start=0, end=9, data=b'a'), Event(start=9, end=18, data=b'b')]
    """

    __slots__ = ("_lines", "_offset", "_pending", "_scanned")

    def __init__(self) -> None:
        self._pending = b""  # bytes of the event not yet complete
        self._offset = 0  # stream offset of _pending's first byte
        self._scanned = 0  # how much of _pending has been read as whole lines
        self._lines: list[bytes] | None = None  # data lines of the event in progress

    @property
    def pending(self) -> bytes:
        """The bytes of the event in progress (all of it that has arrived)."""
        return self._pending

    def feed(self, chunk: bytes, final: bool = False) -> list[Event]:
        """The events that `chunk` completed; `final` says the stream ends after it."""
        data = self._pending + chunk if self._pending else chunk
        events: list[Event] = []
        start, position, lines = 0, self._scanned, self._lines
        while (found := _line_end(data, position, final)) is not None:
            line = data[position : found[0]]
            position = found[1]
            if line:
                lines = _field(line, lines)
                continue
            joined = b"\n".join(lines) if lines is not None else None
            events.append(Event(self._offset + start, self._offset + position, joined))
            start, lines = position, None
        self._pending = data[start:]
        self._offset += start
        self._scanned = position - start
        self._lines = lines
        return events


def _line_end(data: bytes, position: int, final: bool) -> tuple[int, int] | None:
    """(end of the line starting at `position`, start of the next), or None if it is not whole.

    Two `find`s rather than a regex: most streams end lines in LF alone, and this is the loop
    every streamed byte goes through.
    """
    lf = data.find(b"\n", position)
    cr = data.find(b"\r", position, len(data) if lf < 0 else lf)
    if cr < 0:
        return None if lf < 0 else (lf, lf + 1)
    if cr + 1 < len(data):
        return (cr, cr + 2) if data[cr + 1] == 0x0A else (cr, cr + 1)
    return (cr, cr + 1) if final else None  # half a CRLF, perhaps: wait for the next byte


def _field(line: bytes, lines: list[bytes] | None) -> list[bytes] | None:
    """Add a `data` line's value to the event's data lines; every other field is ignored."""
    if line[:4] != b"data" or (len(line) > 4 and line[4:5] != b":"):
        return lines
    value = line[5:]
    if value[:1] == b" ":
        value = value[1:]
    if lines is None:
        return [value]
    lines.append(value)
    return lines


def split_events(body: bytes) -> list[Event]:
    """Every complete event of a whole stream; a trailing unterminated event is not one."""
    return EventSplitter().feed(body, final=True)
