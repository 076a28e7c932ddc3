"""Worker snapshots of custom collectors, and how the supervisor merges them (workers/snapshots)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import Counter
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from sidecar.drift.recorder import DriftRecorder
from sidecar.drift.settings import DriftSettings
from sidecar.workers import snapshots
from sidecar.workers.snapshots import Family, LocalRegistry, Sample, SnapshotMerge, SnapshotWriter
from tests.test_drift_recorder import reference, table


def family(name: str, kind: str, *samples: tuple[str, dict[str, str], float]) -> Family:
    return Family(name, kind, "help", [Sample(*sample) for sample in samples])


def values(families: list[Family] | list[Metric]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.values()))): sample.value
        for fam in families
        for sample in fam.samples
    }


def test_counters_and_histograms_add_up_gauges_follow_their_policy() -> None:
    def worker(bins: float, le_one: float, score: float, rows: float, t0: float) -> list[Family]:
        return [
            family("ml_drift_bin", "counter", ("ml_drift_bin_total", {"bin": "b00"}, bins)),
            family(
                "ml_drift_pit",
                "histogram",
                ("ml_drift_pit_bucket", {"le": "1.0"}, le_one),
                ("ml_drift_pit_count", {}, le_one),
            ),
            family("ml_drift_score", "gauge", ("ml_drift_score", {"stat": "psi"}, score)),
            family("ml_drift_window_rows", "gauge", ("ml_drift_window_rows", {}, rows)),
            family("process_start_time_seconds", "gauge", ("process_start_time_seconds", {}, t0)),
        ]

    merged = values(snapshots.merge([worker(3, 5, 0.2, 100, 50), worker(4, 6, 0.1, 30, 40)]))
    assert merged == {
        ("ml_drift_bin_total", ("b00",)): 7,
        ("ml_drift_pit_bucket", ("1.0",)): 11,
        ("ml_drift_pit_count", ()): 11,
        ("ml_drift_score", ("psi",)): 0.2,  # the worst worker speaks for the pod
        ("ml_drift_window_rows", ()): 130,
        ("process_start_time_seconds", ()): 40,
    }


def test_samples_with_other_labels_stay_apart() -> None:
    one = [family("ml_drift_bin", "counter", ("ml_drift_bin_total", {"bin": "b00"}, 1))]
    two = [family("ml_drift_bin", "counter", ("ml_drift_bin_total", {"bin": "b01"}, 2))]
    assert values(snapshots.merge([one, two])) == {
        ("ml_drift_bin_total", ("b00",)): 1,
        ("ml_drift_bin_total", ("b01",)): 2,
    }


class Fixed:
    """A custom collector with settable samples, standing in for a worker's drift recorder."""

    def __init__(self, count: float, gauge: float) -> None:
        self.count, self.gauge = count, gauge

    def collect(self) -> list[Metric]:
        counter = Metric("ml_drift_bin", "help", "counter")
        counter.add_sample("ml_drift_bin_total", {"bin": "b00"}, self.count)
        return [counter, GaugeMetricFamily("ml_drift_status", "help", value=self.gauge)]


def test_a_retired_worker_keeps_its_counters_and_loses_its_gauges(tmp_path: Path) -> None:
    first, second = Fixed(5, 2), Fixed(3, 1)
    writers = [
        SnapshotWriter([collector], tmp_path / f"{pid}{snapshots.SUFFIX}")
        for pid, collector in ((101, first), (102, second))
    ]
    for writer in writers:
        writer.write()
    merge = SnapshotMerge(tmp_path)
    assert values(list(merge.collect())) == {
        ("ml_drift_bin_total", ("b00",)): 8,
        ("ml_drift_status", ()): 2,
    }

    merge.retire(writers[0].path)  # the first worker died after its last snapshot
    assert not writers[0].path.exists()
    second.count, second.gauge = 4, 0
    writers[1].write()
    assert values(list(merge.collect())) == {
        ("ml_drift_bin_total", ("b00",)): 9,  # 5 kept from the dead worker, 4 from the live one
        ("ml_drift_status", ()): 0,
    }


def test_a_worker_snapshots_only_what_lives_in_its_own_process(tmp_path: Path) -> None:
    """prometheus_client's own metrics are in the mmap files already; a custom collector's
    samples are not, so only those go into the snapshot, in registration order."""
    registry = LocalRegistry()
    Counter("sidecar_plain", "help", registry=registry).inc()
    custom = Fixed(1, 0)
    registry.register(custom)
    assert registry.local == [custom]
    writer = SnapshotWriter(registry.local, tmp_path / f"7{snapshots.SUFFIX}")
    writer.write()
    assert [f.name for f in snapshots.read(writer.path)] == ["ml_drift_bin", "ml_drift_status"]


def test_unreadable_snapshot_counts_as_none(tmp_path: Path) -> None:
    (tmp_path / f"9{snapshots.SUFFIX}").write_bytes(b"\xc1not msgpack")
    assert list(SnapshotMerge(tmp_path).collect()) == []


def test_two_workers_drift_counts_equal_one_process_fed_everything(tmp_path: Path) -> None:
    """The merged drift bins and PIT histogram of two recorders fed the two halves of a stream
    are those of one recorder fed all of it."""
    rng = np.random.default_rng(3)
    profile = reference(numeric={"x": rng.normal(0, 1, 4000), "y": rng.normal(5, 2, 4000)})
    rows = {"x": rng.normal(0.4, 1, 1500).tolist(), "y": rng.normal(5, 3, 1500).tolist()}

    def drift() -> DriftRecorder:
        settings = DriftSettings()
        return DriftRecorder(profile, model_name="iris", model_version="1", settings=settings)

    whole, halves = drift(), [drift(), drift()]
    whole.observe_features(table(rows))
    for index, (start, stop) in enumerate(((0, 600), (600, 1500))):
        halves[index].observe_features(table({k: v[start:stop] for k, v in rows.items()}))
        SnapshotWriter([halves[index]], tmp_path / f"{index}{snapshots.SUFFIX}").write()

    merged = values(list(SnapshotMerge(tmp_path).collect()))
    expected = values(list(whole.collect()))
    counted = ("ml_drift_bin", "ml_drift_pit")
    counts = {k: v for k, v in expected.items() if k[0].startswith(counted)}
    assert len(counts) > 40  # bins of both features, PIT buckets, sums and counts
    assert {key: merged[key] for key in counts} == pytest.approx(counts, rel=1e-12)
    assert merged[("ml_drift_window_rows", ("1", "iris", "x"))] == 1500
