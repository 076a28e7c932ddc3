"""Memory settings of the serving process (benchmarks/soak.sh, throughput.sh and big_bodies.sh
measure them)."""

from __future__ import annotations

import asyncio
import gc
import platform
import weakref
from collections.abc import Iterator

import pytest

from sidecar import memory
from sidecar.memory import GC_THRESHOLDS, freeze_startup, pin_mmap_threshold, trim_heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_threshold_is_pinned_on_glibc():
    assert pin_mmap_threshold() is True


def test_trimming_the_heap_is_harmless_anywhere():
    trim_heap()


@pytest.fixture
def restored() -> Iterator[None]:
    """The collector as it was before: the rest of the test session collects as usual."""
    thresholds = gc.get_threshold()
    yield
    gc.enable()
    gc.unfreeze()
    gc.set_threshold(*thresholds)


async def test_startup_objects_leave_the_collectors_sight(restored):
    freeze_startup()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == GC_THRESHOLDS


class Node:
    """Refers to itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


async def test_a_quiet_process_still_collects_its_cycles(restored, monkeypatch):
    """No collection runs on its own (the collector is off, as good as a quiet process with
    GC_THRESHOLDS): within IDLE_COLLECT_SECONDS the loop runs one, and the cycle is freed."""
    monkeypatch.setattr(memory, "IDLE_COLLECT_SECONDS", 0.01)
    freeze_startup()
    gc.disable()
    cycle = weakref.ref(Node())
    for _ in range(500):
        if cycle() is None:
            break
        await asyncio.sleep(0.01)
    assert cycle() is None


def test_only_the_young_generation_is_collected_within(restored):
    """While a large payload is read, the next generation waits; on the way out the thresholds
    are what they were."""
    gc.set_threshold(*GC_THRESHOLDS)
    with memory.young_collections_only():
        young, middle, oldest = gc.get_threshold()
        assert (young, oldest) == (GC_THRESHOLDS[0], GC_THRESHOLDS[2])
        assert middle > 1_000_000
    assert gc.get_threshold() == GC_THRESHOLDS
