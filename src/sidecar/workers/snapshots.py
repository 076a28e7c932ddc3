"""Metrics that prometheus_client's multiprocess mode cannot merge, merged across workers by hand.

With `--workers N` every Counter, Gauge and Histogram keeps its values in mmap files that
`MultiProcessCollector` adds up on the supervisor. Custom collectors do not: drift, the labelled
windows, and the process and platform figures are computed at scrape time inside one process.
So each worker writes what those collectors yield to a snapshot file, every `PERIOD` seconds and
at exit, and the supervisor's `SnapshotMerge` merges the snapshots of all workers sample by
sample: counters and histograms add up; a gauge is summed, or its largest or smallest value
kept, by `GAUGE_MERGE`. A dead worker's counters and histograms stay (retire()), its gauges go.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from sidecar.files import write_atomically
from sidecar.logs import RateLimitedLog

log = logging.getLogger(__name__)

PERIOD = 1.0  # seconds between snapshots: how far behind a merged drift counter may be
SUFFIX = ".snapshot"  # not .db: MultiProcessCollector reads every *.db file of the directory

Policy = Literal["sum", "max", "min"]

# How a gauge merges over the workers of one sidecar; unlisted gauges keep their largest value.
# Largest is right for what is the same in every worker (reference fractions, python_info,
# process_max_fds) and for verdicts, where the worst worker speaks for the pod (drift scores and
# status, the share of drifted features). Every worker's rows and resources add up; the pod
# started when its first process did, and its reference is frozen once every worker's is.
GAUGE_MERGE: dict[str, Policy] = {
    "ml_drift_window_count": "sum",
    "ml_drift_reference_frozen": "min",
    "process_resident_memory_bytes": "sum",
    "process_virtual_memory_bytes": "sum",
    "process_open_fds": "sum",
    "process_start_time_seconds": "min",
}
# Types whose samples only grow while their process lives: a dead worker's stay in the sum.
CUMULATIVE = frozenset({"counter", "histogram", "summary"})


class Sample(msgspec.Struct, array_like=True, frozen=True):
    name: str
    labels: dict[str, str]
    value: float


class Family(msgspec.Struct, array_like=True, frozen=True):
    name: str
    type: str
    documentation: str
    samples: list[Sample]


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[Family]).decode


class LocalRegistry(CollectorRegistry):
    """A worker's registry. It remembers, in order, the collectors whose samples exist only in
    this process (everything but prometheus_client's own metric classes): those go into the
    snapshot. Registration order matters: the pipeline's flush-on-scrape collector comes first."""

    def __init__(self) -> None:
        super().__init__()
        self.local: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        if not isinstance(collector, MetricWrapperBase):
            self.local.append(collector)


def families_of(collectors: Iterable[Collector]) -> list[Family]:
    return [
        Family(
            metric.name,
            metric.type,
            metric.documentation,
            [Sample(s.name, s.labels, s.value) for s in metric.samples],
        )
        for collector in collectors
        for metric in collector.collect()
    ]


class SnapshotWriter:
    """Writes the samples of a worker's local collectors to `path`, atomically (a reader sees
    the previous snapshot or the next, never half of one)."""

    def __init__(self, collectors: Sequence[Collector], path: Path) -> None:
        self._collectors = collectors
        self.path = path
        self._complaints = RateLimitedLog(log)

    def write(self) -> None:
        try:
            write_atomically(self.path, _encode(families_of(self._collectors)))
        except OSError as exc:  # a full disk must not stop the proxy; the merge lags instead
            self._complaints.warning(
                "snapshot", "writing a metrics snapshot failed", error=str(exc)
            )


def read(path: Path) -> list[Family]:
    """A snapshot, or nothing if it is gone (its worker was retired meanwhile) or unreadable."""
    try:
        return _decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return []


def merge(sources: Iterable[Sequence[Family]]) -> list[Family]:
    """Merge families of the same name from several processes, sample by (name, labels)."""
    kinds: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for source in sources:
        for family in source:
            first = kinds.setdefault(family.name, family)
            policy = _policy(first)
            merged = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                held = merged.get(key)
                merged[key] = sample.value if held is None else _combine(policy, held, sample.value)
    return [
        Family(
            name,
            kinds[name].type,
            kinds[name].documentation,
            [Sample(sample, dict(labels), value) for (sample, labels), value in samples.items()],
        )
        for name, samples in values.items()
    ]


def cumulative(families: Iterable[Family]) -> list[Family]:
    """The families that outlive their process: counters and histograms."""
    return [family for family in families if family.type in CUMULATIVE]


def _policy(family: Family) -> Policy:
    if family.type in CUMULATIVE:
        return "sum"
    return GAUGE_MERGE.get(family.name, "max")


def _combine(policy: Policy, held: float, value: float) -> float:
    if policy == "sum":
        return held + value
    if policy == "max":
        return max(held, value)
    return min(held, value)


class SnapshotMerge(Collector):
    """The supervisor's view of every worker's snapshot in `directory`, plus its own local
    collectors (`own`: its process figures, which belong to the pod's total like the workers')."""

    def __init__(self, directory: Path, own: Sequence[Collector] = ()) -> None:
        self._directory = directory
        self._own = own
        self._retired: list[Family] = []  # counters and histograms of workers that have exited

    def collect(self) -> Iterable[Metric]:
        snapshots = [read(path) for path in sorted(self._directory.glob("*" + SUFFIX))]
        merged = merge([self._retired, families_of(self._own), *snapshots])
        return [_metric(family) for family in merged]

    def retire(self, path: Path) -> None:
        """A worker has exited: keep its last counters and histograms, forget its gauges."""
        self._retired = merge([self._retired, cumulative(read(path))])
        path.unlink(missing_ok=True)


def _metric(family: Family) -> Metric:
    metric = Metric(family.name, family.documentation, family.type)
    for sample in family.samples:
        metric.add_sample(sample.name, sample.labels, sample.value)
    return metric
