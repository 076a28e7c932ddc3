"""Memory settings for a long-running server process: glibc's mmap threshold, Python's collector,
and what a process gives back once it goes quiet (IDLE_COLLECT_SECONDS).

glibc serves a large block (128 KiB and up, by default) from its own mapping, returned to the
system on free, but it raises that threshold to the size of every such block freed. From then
on, blocks of that size come from the heap, where freed ones leave holes the heap cannot give
back. Under load the recorders allocate and free numpy arrays of many sizes, so RSS climbed in
steps (about 12% within a 10-minute run in benchmarks/soak.sh) and then stayed there. Setting the
threshold explicitly turns the adjustment off (mallopt(3)), as MALLOC_MMAP_THRESHOLD_ would; with
it the same run stays within 1%.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "GC_THRESHOLDS",
    "IDLE_COLLECT_SECONDS",
    "MMAP_THRESHOLD",
    "freeze_startup",
    "pin_mmap_threshold",
    "trim_heap",
    "young_collections_only",
]

MMAP_THRESHOLD = 128 * 1024  # glibc's default starting value
_M_MMAP_THRESHOLD = -3  # from malloc.h

# The collector's thresholds once serving (Python's default: 700, 10, 10). What a request makes
# dies by reference count within microseconds; a young generation that holds 20,000 objects
# before it is collected lets almost all of it die first, instead of being traced and moved up
# a generation every 700 allocations (about 4% less CPU per request, the same wrk run of
# benchmarks/throughput.sh's setup with and without, interleaved as benchmarks/compare.sh does).
GC_THRESHOLDS = (20_000, 20, 20)
_NEVER = 2**30  # a threshold that is not reached
# With those thresholds a process that goes quiet may not collect again for hours: a young
# generation of 20,000 is not filled by a probe and a sweep now and then. Whatever is left in a
# reference cycle waits there, with all it refers to. So when no collection has run for this
# long, and objects were made since the last, the loop runs a full one (short: what startup made
# is frozen), then has glibc give the free pages of its heap back (malloc_trim: a tenth of a
# millisecond when there are none). After 2,000 aborted uploads (benchmarks/big_bodies.sh) the
# collection freed 13,000 objects, connections with their body chunks, and RSS went from 404 to
# 386 MiB; the trim took it to 137 MiB, the baseline: freed chunks of 64 KiB stay in the heap,
# between live objects, until it is trimmed.
IDLE_COLLECT_SECONDS = 10.0


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD; False where the C library is not glibc."""
    mallopt = _glibc("mallopt", (ctypes.c_int, ctypes.c_int))
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim_heap() -> None:
    """Give the free pages of the C heap back to the system (glibc only; elsewhere nothing)."""
    malloc_trim = _glibc("malloc_trim", (ctypes.c_size_t,))
    if malloc_trim is not None:
        malloc_trim(0)


def _glibc(name: str, argtypes: tuple[type[ctypes.c_int | ctypes.c_size_t], ...]) -> Any:
    """glibc's function `name` (returning int), or None with another C library."""
    found = ctypes.util.find_library("c")
    if found is None:
        return None
    try:
        function = getattr(ctypes.CDLL(found), name)
    except (OSError, AttributeError):  # musl and others have neither mallopt nor malloc_trim
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def freeze_startup() -> None:
    """Put what startup made (modules, config, profile, routes, metric families) out of the
    cyclic collector's sight, for good: it lives as long as the process, yet every full
    collection walked all of it. Under load those ran several times a second and took ~25 ms
    each, a pause that every request in flight waited through (benchmarks/throughput.sh's p99
    with a preset: ~20 ms before, ~8 ms after). Then the thresholds are set to GC_THRESHOLDS,
    and the running loop checks every IDLE_COLLECT_SECONDS for a collector gone idle."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    _IdleCollector(asyncio.get_running_loop()).schedule()


class _IdleCollector:
    """A full collection when the collector has not run for IDLE_COLLECT_SECONDS although
    objects were made: a quiet process. Under load collections run every few milliseconds, so
    this never does."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._passes = _passes()

    def schedule(self) -> None:
        self._loop.call_later(IDLE_COLLECT_SECONDS, self._check)

    def _check(self) -> None:
        if _passes() == self._passes and gc.get_count() != (0, 0, 0):
            gc.collect()
            trim_heap()
        self._passes = _passes()
        self.schedule()


def _passes() -> int:
    """Collections so far, of any generation."""
    return sum(generation["collections"] for generation in gc.get_stats())


@contextmanager
def young_collections_only() -> Iterator[None]:
    """Within, the collector passes over the young generation only; on the way out, it catches
    up with the next one if that is due.

    For the reading of a large payload (sidecar.pipeline), in a thread beside the event loop:
    its rows (a few hundred thousand lists, tracked by the collector) outlive young collections
    and fill the next generation, and every pass over that one (one per 20 young ones) took
    ~35 ms per 10 MB of rows, holding the GIL, so the loop and its requests, all along. It
    never finds any of them to be garbage: the rows live until the payload is read. Caught up
    with after they are freed, the same pass takes about a millisecond."""
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], _NEVER, thresholds[2])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if gc.get_count()[1] > thresholds[1]:
            gc.collect(1)
