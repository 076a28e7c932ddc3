"""Worker snapshots of whole registries, and how the supervisor merges them (workers/snapshots)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from sidecar.drift.recorder import DriftRecorder
from sidecar.drift.settings import DriftSettings
from sidecar.workers import snapshots
from sidecar.workers.snapshots import SnapshotMerge, SnapshotRegistry, counts_of, snapshot_of
from tests.test_drift_recorder import reference, table

Values = dict[tuple[str, tuple[str, ...]], float]


def values(families: list[snapshots.Family] | list[Metric]) -> Values:
    return {
        (sample.name, tuple(sorted(sample.labels.values()))): sample.value
        for family in families
        for sample in family.samples
    }


def merged(merge: SnapshotMerge) -> Values:
    return values(list(merge.collect()))


class Fixed:
    """A custom collector with settable samples, standing in for a worker's drift recorder."""

    def __init__(self, count: float, gauge: float) -> None:
        self.count, self.gauge = count, gauge

    def collect(self) -> list[Metric]:
        counter = Metric("ml_drift_bin", "help", "counter")
        counter.add_sample("ml_drift_bin_total", {"bin": "b00"}, self.count)
        return [counter, GaugeMetricFamily("ml_drift_status", "help", value=self.gauge)]


class Worker:
    """A worker's registry: a counter, a histogram, gauges declared with multiprocess modes,
    and a custom collector."""

    def __init__(self) -> None:
        self.registry = SnapshotRegistry()
        self.requests = Counter("ml_requests", "help", ["code"], registry=self.registry)
        self.latency = Histogram("latency", "help", buckets=[1.0], registry=self.registry)
        self.in_flight = Gauge(
            "in_flight", "help", multiprocess_mode="livesum", registry=self.registry
        )
        self.log_up = Gauge("log_up", "help", multiprocess_mode="livemin", registry=self.registry)
        self.info = Gauge("info", "help", multiprocess_mode="max", registry=self.registry)
        self.custom = Fixed(0, 0)
        self.registry.register(self.custom)


def test_counters_and_histograms_add_up_gauges_merge_by_their_declared_mode() -> None:
    """livesum gauges add up, livemin keep the smallest, max the largest; custom collectors'
    gauges follow GAUGE_MERGE (largest when unlisted)."""
    first, second = Worker(), Worker()
    for worker, (requests, in_flight, up, status) in (
        (first, (3, 2, 1, 2)),
        (second, (4, 5, 0, 1)),
    ):
        worker.requests.labels("200").inc(requests)
        worker.latency.observe(0.5)
        worker.in_flight.set(in_flight)
        worker.log_up.set(up)
        worker.info.set(1)
        worker.custom.count, worker.custom.gauge = requests, status
    merge = SnapshotMerge()
    merge.put(1, snapshot_of(first.registry))
    merge.put(2, snapshot_of(second.registry))
    found = merged(merge)
    assert found[("ml_requests_total", ("200",))] == 7
    assert found[("latency_bucket", ("1.0",))] == 2
    assert found[("latency_count", ())] == 2
    assert found[("latency_sum", ())] == 1.0
    assert found[("in_flight", ())] == 7
    assert found[("log_up", ())] == 0
    assert found[("info", ())] == 1
    assert found[("ml_drift_bin_total", ("b00",))] == 7
    assert found[("ml_drift_status", ())] == 2  # the worst worker speaks for the pod


def test_custom_gauges_merge_by_gauge_merge() -> None:
    def worker(score: float, rows: float, started: float) -> list[snapshots.Family]:
        gauges = [
            GaugeMetricFamily("ml_drift_score", "help", labels=["stat"]),
            GaugeMetricFamily("ml_drift_window_rows", "help", value=rows),
            GaugeMetricFamily("process_start_time_seconds", "help", value=started),
        ]
        gauges[0].add_metric(["psi"], score)

        class Custom:
            def collect(self) -> list[Metric]:
                return list(gauges)

        return snapshots.families_of([Custom()])

    assert values(snapshots.merge([worker(0.2, 100, 50), worker(0.1, 30, 40)])) == {
        ("ml_drift_score", ("psi",)): 0.2,
        ("ml_drift_window_rows", ()): 130,
        ("process_start_time_seconds", ()): 40,
    }


def test_a_gauge_mode_that_cannot_merge_is_refused_at_registration() -> None:
    with pytest.raises(ValueError, match="'mostrecent' of a gauge cannot be merged"):
        Gauge("g", "help", multiprocess_mode="mostrecent", registry=SnapshotRegistry())


def test_a_workers_later_snapshot_replaces_its_earlier_one() -> None:
    worker = Worker()
    merge = SnapshotMerge()
    for total in (1, 2, 3):
        worker.requests.labels("200").inc()
        merge.put(7, snapshot_of(worker.registry))
        assert merged(merge)[("ml_requests_total", ("200",))] == total


def test_a_retired_worker_keeps_its_counters_and_loses_its_gauges() -> None:
    first, second = Worker(), Worker()
    first.requests.labels("200").inc(5)
    first.in_flight.set(2)
    second.requests.labels("200").inc(3)
    second.in_flight.set(1)
    merge = SnapshotMerge()
    merge.put(101, snapshot_of(first.registry))
    merge.put(102, snapshot_of(second.registry))
    assert merged(merge)[("in_flight", ())] == 3

    merge.retire(101)  # the first worker died after its last snapshot
    second.requests.labels("200").inc(1)
    second.in_flight.set(0)
    merge.put(102, snapshot_of(second.registry))
    found = merged(merge)
    assert found[("ml_requests_total", ("200",))] == 9  # 5 kept from the dead worker, 4 live
    assert found[("latency_count", ())] == 0
    assert found[("in_flight", ())] == 0

    merge.retire(102)
    third = Worker()
    merge.put(103, snapshot_of(third.registry))
    assert merged(merge)[("ml_requests_total", ("200",))] == 9  # every retired worker's


class Scored:
    """A custom collector whose gauges cost work, as drift scores do: it counts its collects."""

    def __init__(self) -> None:
        self.count = 0.0
        self.collects = 0

    def collect(self) -> list[Metric]:
        self.collects += 1
        return [*self.collect_cumulative(), GaugeMetricFamily("ml_score", "help", value=1)]

    def collect_cumulative(self) -> list[Metric]:
        counter = Metric("ml_scored", "help", "counter")
        counter.add_sample("ml_scored_total", {}, self.count)
        return [counter]


def test_counts_carry_counters_and_histograms_and_cost_no_gauges() -> None:
    """A snapshot of counts has every counter and histogram and no gauge, and it takes them
    from a collector's collect_cumulative, never running its collect (the drift scores)."""
    worker = Worker()
    scored = Scored()
    worker.registry.register(scored)
    worker.requests.labels("200").inc(3)
    worker.latency.observe(0.5)
    worker.in_flight.set(2)
    scored.count, worker.custom.count = 4, 5
    counts = values(snapshots._decode(counts_of(worker.registry)))
    assert scored.collects == 0
    assert counts[("ml_requests_total", ("200",))] == 3
    assert counts[("latency_count", ())] == 1
    assert counts[("ml_scored_total", ())] == 4
    assert counts[("ml_drift_bin_total", ("b00",))] == 5
    gauges = {"in_flight", "log_up", "info", "ml_drift_status", "ml_score"}
    assert not {name for name, _ in counts} & gauges

    worker.registry.unregister(scored)
    assert ("ml_scored_total", ()) not in values(snapshots._decode(counts_of(worker.registry)))


def test_counts_newer_than_the_whole_snapshot_update_its_counters_and_keep_its_gauges() -> None:
    worker = Worker()
    worker.requests.labels("200").inc(1)
    worker.in_flight.set(2)
    worker.custom.gauge = 1
    merge = SnapshotMerge()
    merge.put(5, snapshot_of(worker.registry))
    worker.requests.labels("200").inc(4)
    worker.latency.observe(0.5)
    worker.in_flight.set(0)
    worker.custom.gauge = 2
    merge.put_counts(5, counts_of(worker.registry))
    found = merged(merge)
    assert found[("ml_requests_total", ("200",))] == 5
    assert found[("latency_count", ())] == 1
    assert found[("in_flight", ())] == 2  # as of the whole snapshot: counts carry no gauges
    assert found[("ml_drift_status", ())] == 1

    worker.requests.labels("200").inc(1)
    merge.put_counts(5, counts_of(worker.registry))  # read or not, the latest counts stand
    merge.put_counts(5, counts_of(worker.registry))
    assert merged(merge)[("ml_requests_total", ("200",))] == 6
    worker.in_flight.set(1)
    merge.put(5, snapshot_of(worker.registry))  # a whole one replaces all before it
    found = merged(merge)
    assert (found[("ml_requests_total", ("200",))], found[("in_flight", ())]) == (6, 1)


def test_a_worker_retired_after_counts_keeps_them() -> None:
    """A worker killed between scrapes keeps the counts of its last periodic snapshot."""
    worker = Worker()
    merge = SnapshotMerge()
    merge.put(3, snapshot_of(worker.registry))
    worker.requests.labels("200").inc(7)
    merge.put_counts(3, counts_of(worker.registry))
    merge.retire(3)
    assert merged(merge)[("ml_requests_total", ("200",))] == 7


def test_created_is_the_earliest_and_the_exemplar_the_latest() -> None:
    """A counter's `_created` is its first worker's; a bucket's exemplar is its newest
    observation's, whichever worker made it (merged in either order)."""
    first, second = Worker(), Worker()
    first.requests.labels("200").inc()
    second.requests.labels("200").inc()
    first.latency.observe(0.5, {"trace_id": "old"})
    second.latency.observe(0.7, {"trace_id": "new"})
    merge = SnapshotMerge()
    merge.put(2, snapshot_of(second.registry))
    merge.put(1, snapshot_of(first.registry))
    created = values(snapshots.families_of([first.registry]))[("ml_requests_created", ("200",))]
    metrics = list(merge.collect())
    assert values(metrics)[("ml_requests_created", ("200",))] == created
    bucket = next(
        sample
        for metric in metrics
        for sample in metric.samples
        if sample.name == "latency_bucket" and sample.labels["le"] == "1.0"
    )
    assert bucket.value == 2
    assert bucket.exemplar is not None
    assert bucket.exemplar.labels == {"trace_id": "new"}
    assert bucket.exemplar.value == 0.7


def test_an_unreadable_snapshot_leaves_what_was_read_before_it() -> None:
    worker = Worker()
    worker.requests.labels("200").inc(2)
    merge = SnapshotMerge()
    merge.put(9, snapshot_of(worker.registry))
    assert merged(merge)[("ml_requests_total", ("200",))] == 2
    merge.put(9, b"\xc1not msgpack")
    merge.put_counts(9, b"\xc1not msgpack either")
    assert merged(merge)[("ml_requests_total", ("200",))] == 2


def test_the_supervisors_own_collectors_join_the_sum() -> None:
    worker = Worker()
    worker.custom.count = 4
    merge = SnapshotMerge(own=[Fixed(1, 0)])
    merge.put(1, snapshot_of(worker.registry))
    assert merged(merge)[("ml_drift_bin_total", ("b00",))] == 5


def test_two_workers_drift_counts_equal_one_process_fed_everything() -> None:
    """The merged drift bins and PIT histogram of two recorders fed the two halves of a stream
    are those of one recorder fed all of it."""
    rng = np.random.default_rng(3)
    profile = reference(numeric={"x": rng.normal(0, 1, 4000), "y": rng.normal(5, 2, 4000)})
    rows = {"x": rng.normal(0.4, 1, 1500).tolist(), "y": rng.normal(5, 3, 1500).tolist()}

    def drift() -> DriftRecorder:
        settings = DriftSettings()
        return DriftRecorder(profile, model_name="iris", model_version="1", settings=settings)

    whole, merge = drift(), SnapshotMerge()
    whole.observe_features(table(rows))
    for index, (start, stop) in enumerate(((0, 600), (600, 1500))):
        half, registry = drift(), SnapshotRegistry()
        registry.register(half)
        half.observe_features(table({k: v[start:stop] for k, v in rows.items()}))
        merge.put(index, snapshot_of(registry))

    found = merged(merge)
    expected = values(list(whole.collect()))
    counted = ("ml_drift_bin", "ml_drift_pit")
    counts = {k: v for k, v in expected.items() if k[0].startswith(counted)}
    assert len(counts) > 40  # bins of both features, PIT buckets, sums and counts
    assert {key: found[key] for key in counts} == pytest.approx(counts, rel=1e-12)
    assert found[("ml_drift_window_rows", ("1", "iris", "x"))] == 1500


def test_a_drift_recorders_counts_are_those_of_its_collect() -> None:
    rng = np.random.default_rng(4)
    profile = reference(numeric={"x": rng.normal(0, 1, 4000)}, categorical={"c": ["a", "b"] * 2000})
    drift = DriftRecorder(profile, model_name="iris", model_version="1", settings=DriftSettings())
    drift.observe_features(table({"x": rng.normal(0, 1, 300).tolist(), "c": ["a", "z"] * 150}))
    counted = ("ml_drift_bin", "ml_drift_pit")
    whole = {k: v for k, v in values(list(drift.collect())).items() if k[0].startswith(counted)}
    counts = values(list(drift.collect_cumulative()))
    assert len(counts) > 20  # both features' bins, the PIT buckets, sum and count
    assert counts == whole
