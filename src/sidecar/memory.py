"""Memory settings for a long-running server process: glibc's mmap threshold, Python's collector.

glibc serves a large block (128 KiB and up, by default) from its own mapping, returned to the
system on free, but it raises that threshold to the size of every such block freed. From then
on, blocks of that size come from the heap, where freed ones leave holes the heap cannot give
back. Under load the recorders allocate and free numpy arrays of many sizes, so RSS climbed in
steps (about 12% within a 10-minute run in benchmarks/soak.sh) and then stayed there. Setting the
threshold explicitly turns the adjustment off (mallopt(3)), as MALLOC_MMAP_THRESHOLD_ would; with
it the same run stays within 1%.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

__all__ = ["GC_THRESHOLDS", "MMAP_THRESHOLD", "freeze_startup", "pin_mmap_threshold"]

MMAP_THRESHOLD = 128 * 1024  # glibc's default starting value
_M_MMAP_THRESHOLD = -3  # from malloc.h

# The collector's thresholds once serving (Python's default: 700, 10, 10). What a request makes
# dies by reference count within microseconds; a young generation that holds 20,000 objects
# before it is collected lets almost all of it die first, instead of being traced and moved up
# a generation every 700 allocations (about 4% less CPU per request, the same wrk run of
# benchmarks/throughput.sh's setup with and without, interleaved as benchmarks/compare.sh does).
GC_THRESHOLDS = (20_000, 20, 20)


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def freeze_startup() -> None:
    """Put what startup made (modules, config, profile, routes, metric families) out of the
    cyclic collector's sight, for good: it lives as long as the process, yet every full
    collection walked all of it. Under load those ran several times a second and took ~25 ms
    each, a pause that every request in flight waited through (benchmarks/throughput.sh's p99
    with a preset: ~20 ms before, ~8 ms after). Then the thresholds are set to GC_THRESHOLDS."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
