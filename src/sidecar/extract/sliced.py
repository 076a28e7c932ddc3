"""Large payloads read a slice at a time, so that no single call holds the GIL for long.

A large exchange is read in a thread beside the event loop (sidecar.pipeline), and the loop runs
only while that thread lets go of the GIL: between two bytecodes, never inside one call into C.
orjson parses 10 MB of rows in 100 to 250 ms without letting go, `np.asarray` over them takes
about 100 ms, and freeing their Python objects about 30 ms: each would stop every request in
flight for as long. Here each of them is done in pieces of a few milliseconds, with results
equal to doing it at once; within reading_large(), the thread pauses between two pieces.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import numpy as np
import orjson
from numpy.typing import DTypeLike, NDArray

__all__ = [
    "CHUNK_ROWS",
    "SLICE_BYTES",
    "asarray",
    "contains",
    "loads",
    "reading_large",
]

SLICE_BYTES: Final = 64 * 1024  # JSON parsed per call: about 2 ms of rows
CHUNK_ROWS: Final = 16 * 1024  # list items converted or freed per call: 1 to 4 ms

_COMMA, _OPEN, _CLOSE, _OPEN_OBJECT, _CLOSE_OBJECT, _QUOTE, _BACKSLASH = b',[]{}"\\'
# Deeper documents are parsed whole: each level costs the scan a pass over the body.
_MAX_DEPTH: Final = 64
# Within reading_large(): .lists, the large lists loads() made; .rest, how much longer than it
# worked the thread pauses; .since, when it last paused.
_large = threading.local()


@contextmanager
def reading_large(rest: float) -> Iterator[None]:
    """Within, in this thread: after each piece, pause `rest` times as long as the work since
    the last pause took, and keep the large lists that loads() makes, to free them CHUNK_ROWS
    items at a time on the way out (let go of at once, the rows of 10 MB take ~30 ms to free).

    Pausing, the thread lets go of the GIL: the event loop, if it waits for it, takes it at
    once, not after sys.getswitchinterval() (5 ms); and the reading takes at most 1 / (1 + rest)
    of the process's time, so the loop keeps the rest whatever arrives."""
    kept: list[list[Any]] = []
    _large.lists, _large.rest, _large.since = kept, rest, time.perf_counter()
    try:
        yield
    finally:
        for items in kept:
            while items:
                del items[-CHUNK_ROWS:]  # from the end: nothing moves
                _pause()
        _large.lists = _large.since = None


def _pause() -> None:
    since = getattr(_large, "since", None)
    if since is not None:
        time.sleep(_large.rest * (time.perf_counter() - since))
        _large.since = time.perf_counter()


def loads(body: bytes) -> Any:
    """orjson.loads(body), its largest array parsed SLICE_BYTES at a time.

    Raises orjson.JSONDecodeError where orjson.loads would; the caller falls back as it does for
    a whole body (e.g. to `json` for NaN literals)."""
    found = _largest_array(body) if len(body) > 2 * SLICE_BYTES else None
    if found is None:
        return orjson.loads(body)
    start, stop, separators = found
    token = uuid.uuid4().hex.encode()  # stands for the array in the rest of the document
    while contains(body, token):
        token = uuid.uuid4().hex.encode()
    skeleton = orjson.loads(body[:start] + b'"' + token + b'"' + body[stop + 1 :])
    items: list[Any] = []
    kept = getattr(_large, "lists", None)
    if kept is not None:
        kept.append(items)
    # Cut at separators about SLICE_BYTES apart; each piece is a run of whole elements.
    targets = np.arange(start + SLICE_BYTES, stop, SLICE_BYTES)
    cuts = np.unique(separators[np.searchsorted(separators, targets).clip(0, separators.size - 1)])
    for left, right in itertools.pairwise([start, *cuts.tolist(), stop]):
        piece = body[left + 1 : right]
        if not piece.strip():  # "[1,,2]" must fail as a whole, not parse as [1, 2]
            return orjson.loads(body)
        _pause()
        items += orjson.loads(b"[" + piece + b"]")
    return _put(skeleton, token.decode(), items)


def _largest_array(body: bytes) -> tuple[int, int, NDArray[np.intp]] | None:
    """The array with the most elements: where its brackets are and where the commas between
    its elements are; None if it has fewer than three or the body's brackets do not balance.

    numpy finds the structural characters (outside strings), their depth, and which commas
    belong to which array: arrays at one depth follow each other, so the commas at that depth
    between two of their openings are the elements' separators of the first."""
    text = np.frombuffer(body, np.uint8)
    marks = text == _COMMA
    for char in (_OPEN, _CLOSE, _OPEN_OBJECT, _CLOSE_OBJECT):
        marks |= text == char
    events = np.flatnonzero(marks)
    quotes = _unescaped(text, np.flatnonzero(text == _QUOTE))
    events = events[np.searchsorted(quotes, events) % 2 == 0]  # not inside a string
    chars = text[events]
    opens = (chars == _OPEN) | (chars == _OPEN_OBJECT)
    closes = (chars == _CLOSE) | (chars == _CLOSE_OBJECT)
    # Depth after each event. int32 throughout: summed into numpy's default int64 instead, the
    # same cumsum took 80 ms and held the GIL for 40 of them.
    depth = np.cumsum(opens.astype(np.int32) - closes, dtype=np.int32)
    if depth.size == 0 or depth[-1] != 0 or depth.min() < 0 or depth.max() > _MAX_DEPTH:
        return None
    is_comma = chars == _COMMA
    best: tuple[int, int, int] | None = None  # (commas, event of the opening, depth)
    # The depths at which arrays open, counted (np.unique would sort: 20 times slower).
    for level in np.flatnonzero(np.bincount(depth[chars == _OPEN])):
        openings = np.flatnonzero(opens & (depth == level))
        commas = np.flatnonzero(is_comma & (depth == level))
        owned = np.diff(np.searchsorted(commas, openings), append=commas.size)
        owned[chars[openings] != _OPEN] = 0  # an object's commas separate members
        widest = int(owned.argmax())
        if best is None or owned[widest] > best[0]:
            best = (int(owned[widest]), int(openings[widest]), int(level))
    if best is None or best[0] < 2:
        return None
    _, opening, within = best
    after = slice(opening + 1, None)
    closing = opening + 1 + int(np.flatnonzero(closes[after] & (depth[after] == within - 1))[0])
    if chars[closing] != _CLOSE:  # "[1,2}": the pieces and the rest would each parse
        return None
    inside = slice(opening + 1, closing)
    separators = events[inside][is_comma[inside] & (depth[inside] == within)]
    return int(events[opening]), int(events[closing]), separators


def _unescaped(text: NDArray[np.uint8], quotes: NDArray[np.intp]) -> NDArray[np.intp]:
    """The quotes that delimit strings: those after an even run of backslashes."""
    run = np.zeros(quotes.size, np.intp)
    active = quotes > 0
    while active.any():
        at = quotes[active] - run[active] - 1
        escaped = text[at] == _BACKSLASH
        run[active] += escaped
        active[active] = escaped & (at > 0)
    delimiting: NDArray[np.intp] = quotes[run % 2 == 0]
    return delimiting


def _put(value: Any, token: str, items: list[Any]) -> Any:
    """`value` with the string `token` replaced by `items` (the token occurs once)."""
    if value == token:
        return items
    stack = [value]
    while stack:
        node = stack.pop()
        pairs = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in pairs:
            if child == token:
                node[key] = items
                return value
            if isinstance(child, dict | list):
                stack.append(child)
    return value


def contains(data: bytes, needle: bytes) -> bool:
    """`needle in data`, 16 slices' worth at a time (one search over 10 MB: ~5 ms)."""
    step = 16 * SLICE_BYTES
    for start in range(0, len(data), step):
        if data.find(needle, start, start + step + len(needle) - 1) >= 0:
            return True
        _pause()
    return False


def asarray(values: Any, dtype: DTypeLike | None = None) -> NDArray[Any]:
    """np.asarray(values, dtype), CHUNK_ROWS items at a time for a long list. When the pieces
    do not come out alike (a ragged row, ints in one piece and floats in another, an error),
    the whole list is converted at once, so the result and any error are numpy's own."""
    if not isinstance(values, list) or len(values) <= CHUNK_ROWS:
        return np.asarray(values, dtype=dtype)
    parts = []
    try:
        for start in range(0, len(values), CHUNK_ROWS):
            _pause()
            parts.append(np.asarray(values[start : start + CHUNK_ROWS], dtype=dtype))
    except (ValueError, TypeError, RecursionError):
        return np.asarray(values, dtype=dtype)
    first = parts[0]
    if all(_alike(part, first) for part in parts):
        return np.concatenate(parts)
    return np.asarray(values, dtype=dtype)


def _alike(part: NDArray[Any], first: NDArray[Any]) -> bool:
    same_type = part.dtype == first.dtype or part.dtype.kind == first.dtype.kind == "U"
    return same_type and part.shape[1:] == first.shape[1:]
