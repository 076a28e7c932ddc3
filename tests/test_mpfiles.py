"""Folding the multiprocess files of exited processes (sidecar.workers.mpfiles), on files written by
real processes in prometheus_client's multiprocess mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from sidecar.workers import mpfiles

# One process: a labelled counter, a histogram and a gauge per multiprocess mode, all from `n`.
# Values are multiples of 1/4, so sums are exact in any order.
PROCESS = """
import sys
from prometheus_client import Counter, Gauge, Histogram
n = float(sys.argv[1])
Counter("requests", "Requests.", ["code"], registry=None).labels("200").inc(n)
Histogram("latency_seconds", "Latency.", buckets=[0.5, 1], registry=None).observe(n / 4)
for mode in ("sum", "max", "min", "mostrecent", "livesum", "all"):
    Gauge("g_" + mode, "A gauge.", multiprocess_mode=mode, registry=None).set(n)
"""
FOLDED = ["counter", "histogram", "gauge_sum", "gauge_max", "gauge_min", "gauge_mostrecent"]

Samples = dict[tuple[str, str, tuple[tuple[str, str], ...]], float]


def run(directory: Path, n: float) -> int:
    """Run one process that writes its values into `directory`; its pid once it has exited."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    process = subprocess.Popen([sys.executable, "-c", PROCESS, str(n)], env=env)
    assert process.wait(timeout=60) == 0
    return process.pid


def collect(directory: Path) -> Samples:
    collector = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]
    return {
        (metric.type, sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in collector.collect()  # type: ignore[no-untyped-call]
        for sample in metric.samples
    }


def without_its_own_gauges(directory: Path, pid: int, scratch: Path) -> Samples:
    """What the collector reads once `pid` is gone: its live and per-pid gauges no longer."""
    shutil.copytree(directory, scratch)
    for mode in ("livesum", "all"):
        (scratch / f"gauge_{mode}_{pid}.db").unlink()
    return collect(scratch)


def test_folding_a_dead_process_leaves_the_merged_output_as_it_was(tmp_path: Path) -> None:
    """Counters and histograms keep counting a retired process's values; sum, max, min and
    mostrecent gauges keep its value in the running; its livesum and all gauges go."""
    directory = tmp_path / "mp"
    directory.mkdir()
    first, second, third = run(directory, 1), run(directory, 2), run(directory, 4)
    # The last and largest first: the retired max and mostrecent values must still win.
    for step, pid in enumerate((third, first, second)):
        expected = without_its_own_gauges(directory, pid, tmp_path / f"expected{step}")
        mpfiles.retire(directory, pid)
        assert collect(directory) == expected
    assert collect(directory)[("counter", "requests_total", (("code", "200"),))] == 7
    assert collect(directory)[("gauge", "g_mostrecent", ())] == 4
    assert sorted(path.name for path in directory.glob("*.db")) == sorted(
        f"{prefix}_{mpfiles.RETIRED}.db" for prefix in FOLDED
    )


def test_restarts_do_not_grow_the_directory(tmp_path: Path) -> None:
    """Six processes in turn, each retired while the next one runs: the files are the live
    process's and one retired file per type and mode, and the counter holds every increment."""
    live = run(tmp_path, 1)
    for n in range(2, 7):
        following = run(tmp_path, n)
        mpfiles.retire(tmp_path, live)
        live = following
        names = {path.name for path in tmp_path.glob("*.db")}
        assert names == {f"{prefix}_{mpfiles.RETIRED}.db" for prefix in FOLDED} | {
            f"{prefix}_{live}.db" for prefix in [*FOLDED, "gauge_livesum", "gauge_all"]
        }
    assert collect(tmp_path)[("counter", "requests_total", (("code", "200"),))] == sum(range(7))


def test_a_fold_that_fails_leaves_the_files_counted_once(tmp_path: Path) -> None:
    """When a retired file cannot be written, the dead process's values stay in its own files,
    counted once; its live gauges are gone all the same."""
    first, second = run(tmp_path, 1), run(tmp_path, 2)
    mpfiles.retire(tmp_path, first)
    (tmp_path / "counter_retired.db.tmp").mkdir()  # where the new retired counters would go
    with pytest.raises(OSError, match="Is a directory"):
        mpfiles.retire(tmp_path, second)
    assert (tmp_path / f"counter_{second}.db").exists()
    assert not (tmp_path / f"gauge_livesum_{second}.db").exists()
    after = collect(tmp_path)
    assert after[("counter", "requests_total", (("code", "200"),))] == 3
    assert after[("histogram", "latency_seconds_count", ())] == 2
