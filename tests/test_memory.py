"""Memory settings of the serving process (benchmarks/soak.sh and throughput.sh measure them)."""

from __future__ import annotations

import gc
import platform

import pytest

from sidecar.memory import GC_THRESHOLDS, freeze_startup, pin_mmap_threshold


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_threshold_is_pinned_on_glibc():
    assert pin_mmap_threshold() is True


def test_startup_objects_leave_the_collectors_sight():
    thresholds = gc.get_threshold()
    try:
        freeze_startup()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
        gc.set_threshold(*thresholds)
