"""The glibc mmap threshold that keeps RSS flat (benchmarks/soak.sh measures the effect)."""

from __future__ import annotations

import platform

import pytest

from sidecar.malloc import pin_mmap_threshold


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_threshold_is_pinned_on_glibc():
    assert pin_mmap_threshold() is True
