"""The prometheus_client internals sidecar relies on, checked against the installed version.

prometheus_client has no public API for two things sidecar does: adding a batch of observations
to a histogram at once (src/sidecar/recorders/batch.py) and folding the multiprocess files of
exited workers (src/sidecar/workers/mpfiles.py). pyproject.toml pins prometheus-client to the
releases these tests passed with. Before raising the pin, run them against the new release: each
failure names the internal that changed and the module to adapt.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, Summary
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

from sidecar.workers import mpfiles

BATCH = "src/sidecar/recorders/batch.py"
MPFILES = "src/sidecar/workers/mpfiles.py"
SNAPSHOTS = "src/sidecar/workers/snapshots.py"

BOUNDS = (0.5, 1.0, 2.0)
# Both at a bound and between bounds, so that "a value falls in the first bucket whose bound is
# >= it" is checked at the edge; every value a multiple of 1/4, so sums are exact in any order.
VALUES = [0.25, 0.5, 0.75, 1.0, 1.0, 2.0, 2.5, 7.0]

# One worker process in multiprocess mode: a counter, one histogram fed by observe_many and one
# by observe() with the same values, and a gauge in every multiprocess mode prometheus_client has.
PROCESS = """
import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from sidecar.recorders.batch import observe_many
bounds, values = {bounds!r}, {values!r}
Counter("requests", "Requests.", ["code"], registry=None).labels("200").inc(3)
many = Histogram("many", "By observe_many.", ["route"], buckets=bounds, registry=None)
observe_many(many.labels("r"), np.asarray(values, dtype=np.float64))
one = Histogram("one", "By observe().", ["route"], buckets=bounds, registry=None)
for value in values:
    one.labels("r").observe(value)
for mode in sorted(Gauge._MULTIPROC_MODES):
    Gauge("g_" + mode, "A gauge.", multiprocess_mode=mode, registry=None).set(5)
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextlib.contextmanager
def relied_on(internal: str, where: str) -> Iterator[None]:
    """Any failure inside means `internal` of prometheus_client changed: say so, and where."""
    try:
        yield
    except Exception as exc:
        pytest.fail(
            f"prometheus_client changed an internal sidecar relies on ({internal}): see {where}\n"
            f"{type(exc).__name__}: {exc}"
        )


def mmaped_dict() -> Any:
    with relied_on("prometheus_client.mmap_dict.MmapedDict", MPFILES):
        return importlib.import_module("prometheus_client.mmap_dict").MmapedDict


def histogram_child() -> Histogram:
    metric = Histogram("h", "H.", ["route"], buckets=BOUNDS, registry=CollectorRegistry())
    return metric.labels("r")


def samples(directory: Path) -> Samples:
    collector = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in collector.collect()  # type: ignore[no-untyped-call]
        for sample in metric.samples
    }


def of(found: Samples, metric: str) -> Samples:
    """The samples of one histogram, keyed without its name."""
    return {
        (name.removeprefix(metric), labels): v
        for (name, labels), v in found.items()
        if name.startswith(metric + "_")
    }


@pytest.fixture(scope="module")
def worker_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The multiprocess directory of one worker that has exited, and the worker's pid."""
    directory = tmp_path_factory.mktemp("multiproc")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    script = PROCESS.format(bounds=BOUNDS, values=VALUES)
    process = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True
    )
    _, stderr = process.communicate(timeout=60)
    with relied_on("multiprocess mode: Gauge._MULTIPROC_MODES, mmap-backed values", MPFILES):
        assert process.returncode == 0, stderr
    return directory, process.pid


# --- recorders/batch.py: a Histogram child's bounds, buckets and sum -----------------------------


def test_histogram_child_has_bounds_then_inf_and_one_bucket_value_per_bound() -> None:
    """`_upper_bounds` is the buckets asked for and +Inf; `_buckets` holds one value per bound,
    and each value, like `_sum`, takes inc() and get()."""
    child = histogram_child()
    with relied_on("Histogram._upper_bounds, ._buckets and ._sum", BATCH):
        assert list(child._upper_bounds) == [*BOUNDS, math.inf]
        assert len(child._buckets) == len(child._upper_bounds)
        for value in [child._sum, *child._buckets]:
            assert callable(value.inc)
            assert callable(value.get)


def test_histogram_bucket_values_count_only_their_own_bucket() -> None:
    """observe() adds 1 to the first bucket whose bound is >= the value (and to no other), and
    the value to `_sum`; collect() accumulates the buckets, so a bucket value's inc() shows in
    every cumulative bucket from its bound up."""
    child = histogram_child()
    with relied_on("Histogram._buckets hold per-bucket counts that collect() accumulates", BATCH):
        for value in VALUES:
            child.observe(value)
        assert [bucket.get() for bucket in child._buckets] == [2, 3, 1, 2]
        assert child._sum.get() == sum(VALUES)
        child._buckets[1].inc(4)
        child._sum.inc(4.0)
        found = {
            sample.labels.get("le", sample.name): sample.value
            for metric in child.collect()
            for sample in metric.samples
        }
        assert [found[le] for le in ("0.5", "1.0", "2.0", "+Inf")] == [2, 9, 10, 12]
        assert found["h_count"] == 12
        assert found["h_sum"] == sum(VALUES) + 4.0


def test_a_bucket_values_exemplar_is_the_one_collect_shows() -> None:
    """set_exemplars() gives a bucket value an Exemplar with set_exemplar(), as observe() does
    with an exemplar; collect() shows it on that bucket's sample."""
    from prometheus_client.samples import Exemplar

    child = histogram_child()
    with relied_on("Histogram._buckets[i].set_exemplar(Exemplar)", BATCH):
        child._buckets[1].inc(1)
        child._buckets[1].set_exemplar(Exemplar({"trace_id": "abc"}, 0.7, 1.0))
        exemplars = {
            sample.labels["le"]: sample.exemplar
            for metric in child.collect()
            for sample in metric.samples
            if sample.name.endswith("_bucket")
        }
        assert exemplars["1.0"] == Exemplar({"trace_id": "abc"}, 0.7, 1.0)
        assert exemplars["0.5"] is None


def test_observe_many_equals_observe_in_multiprocess_mode(worker_files: tuple[Path, int]) -> None:
    """With --workers the bucket values are mmap-backed: observe_many still writes what
    observe() would, and MultiProcessCollector merges it the same."""
    directory, _ = worker_files
    with relied_on(
        "Histogram value objects in multiprocess mode (values.MultiProcessValue)", BATCH
    ):
        found = samples(directory)
        assert of(found, "many")
        assert of(found, "many") == of(found, "one")


# --- workers/mpfiles.py: the multiprocess file layout and MmapedDict ------------------------------


def test_mmaped_dict_writes_and_reads_back_values_with_timestamps(tmp_path: Path) -> None:
    """MmapedDict(path) makes a file; write_value(key, value, timestamp) sets (and overwrites) a
    key; read_all_values_from_file yields (key, value, timestamp, position) in write order."""
    store_class = mmaped_dict()
    path = tmp_path / "counter_retired.db"
    with relied_on("MmapedDict(path), write_value, close, read_all_values_from_file", MPFILES):
        store = store_class(str(path))
        store.write_value("first", 1.5, 0.0)
        store.write_value("second", 2.0, 1234.5)
        store.write_value("first", 2.5, 0.0)
        store.close()
        entries = list(store_class.read_all_values_from_file(str(path)))
        assert all(len(entry) == 4 for entry in entries)
        assert [entry[:3] for entry in entries] == [("first", 2.5, 0.0), ("second", 2.0, 1234.5)]


def test_each_process_writes_one_file_per_type_and_gauge_mode(
    worker_files: tuple[Path, int],
) -> None:
    """A process's values sit in `<type>_<pid>.db`, gauges in `gauge_<mode>_<pid>.db`: retire()
    finds a dead worker's files by that suffix and folds them by that prefix."""
    directory, pid = worker_files
    with relied_on("multiprocess file names <type>_<pid>.db, gauge_<mode>_<pid>.db", MPFILES):
        modes = sorted(Gauge._MULTIPROC_MODES)
        expected = {"counter", "histogram", *(f"gauge_{mode}" for mode in modes)}
        names = {path.name for path in directory.iterdir()}
        assert names == {f"{prefix}_{pid}.db" for prefix in expected}


def test_every_gauge_mode_is_folded_or_dies_with_its_process() -> None:
    """mpfiles folds the gauge modes whose values outlive their process and deletes the rest:
    every mode prometheus_client has must be one of the modes it knows."""
    with relied_on("Gauge._MULTIPROC_MODES", MPFILES):
        modes = set(Gauge._MULTIPROC_MODES)
        folded = {
            prefix.removeprefix("gauge_")
            for prefix in mpfiles._FOLDS
            if prefix.startswith("gauge_")
        }
        assert folded <= modes
        assert {m for m in modes - folded if not m.startswith("live") and m != "all"} == set()


def test_the_collector_reads_a_retired_file_like_a_process_file(
    worker_files: tuple[Path, int], tmp_path: Path
) -> None:
    """MultiProcessCollector takes the type and the gauge mode from a file's name up to the
    pid, so the folded files, named `<prefix>_retired.db`, merge like any process's."""
    directory, pid = worker_files
    retired = tmp_path / "retired"
    retired.mkdir()
    for path in directory.iterdir():
        prefix = path.name.removesuffix(f"_{pid}.db")
        if prefix in mpfiles._FOLDS:
            (retired / f"{prefix}_{mpfiles.RETIRED}.db").write_bytes(path.read_bytes())
    folded_gauges = {
        "g_" + p.removeprefix("gauge_") for p in mpfiles._FOLDS if p.startswith("gauge_")
    }
    with relied_on("MultiProcessCollector reads <type>[_<mode>]_<anything>.db", MPFILES):
        expected = {
            key: value
            for key, value in samples(directory).items()
            if not key[0].startswith("g_") or key[0] in folded_gauges
        }
        assert samples(retired) == expected
        assert expected[("requests_total", (("code", "200"),))] == 3
        assert expected[("g_max", ())] == 5


# --- workers/snapshots.py: which collectors are prometheus_client's own metrics -----------------


def test_every_metric_class_is_a_metric_wrapper() -> None:
    """LocalRegistry snapshots every collector that is not a MetricWrapperBase: the metric
    classes must all be one, or their values would be counted twice with --workers."""
    with relied_on("prometheus_client.metrics.MetricWrapperBase", SNAPSHOTS):
        for metric_class in (Counter, Gauge, Histogram, Summary, Info, Enum):
            assert issubclass(metric_class, MetricWrapperBase), metric_class.__name__
