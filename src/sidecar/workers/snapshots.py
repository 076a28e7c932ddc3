"""Every worker's metrics, merged on the supervisor from snapshots of whole registries.

With `--workers N` each worker keeps its metrics in an ordinary in-process registry (an update
is an add under the value's own lock: no shared file, no getpid()) and hands the supervisor
snapshots of it, families of samples in msgpack (workers/channel.py carries them): whole ones,
of all it exports, when a scrape asks and as it starts and stops; and every second one of its
counts alone (its counters and histograms), so that a worker killed outright loses little and no
worker computes every second the gauges (drift scores) that only a scrape reads.

The supervisor's `SnapshotMerge` merges the latest snapshots of every running worker, sample by
sample (a worker's gauges as of its latest whole snapshot, its counts as of its latest of
either kind): counters and histograms add up; a gauge is summed, or its largest or smallest
value kept, by the policy its snapshot names: from the `multiprocess_mode` a Gauge was declared
with (the mode that would merge prometheus_client's multiprocess files the same way), or for the
gauges of custom collectors from `GAUGE_MERGE`. When a worker exits, the counters and
histograms of its last snapshot are folded into a retired total, so that no counter goes down
across restarts; its gauges go, whatever their mode.

A Gauge's mode is prometheus_client's private `_multiprocess_mode`, which
tests/test_prometheus_internals.py checks against the installed version.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import msgspec
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from sidecar.logs import RateLimitedLog

log = logging.getLogger(__name__)

Policy = Literal["sum", "max", "min"]

# How a Gauge merges over the workers, by its multiprocess_mode. Only the running workers'
# snapshots hold gauges, so "sum" and "livesum" (and so on) merge alike.
MODE_POLICY: dict[str, Policy] = {
    "sum": "sum",
    "livesum": "sum",
    "max": "max",
    "livemax": "max",
    "min": "min",
    "livemin": "min",
}
# How the gauges of custom collectors merge; unlisted gauges keep their largest value. Largest
# is right for what is the same in every worker (reference fractions, python_info,
# process_max_fds) and for verdicts, where the worst worker speaks for the pod (drift scores and
# status, the share of drifted features). Every worker's rows and resources add up; the pod
# started when its first process did, and its reference is frozen once every worker's is.
GAUGE_MERGE: dict[str, Policy] = {
    "ml_drift_window_rows": "sum",
    "ml_drift_reference_frozen": "min",
    "process_resident_memory_bytes": "sum",
    "process_virtual_memory_bytes": "sum",
    "process_open_fds": "sum",
    "process_start_time_seconds": "min",
}
# Types whose samples only grow while their process lives: a dead worker's stay in the sum.
CUMULATIVE = frozenset({"counter", "histogram", "summary"})


@runtime_checkable
class CountingCollector(Protocol):
    """A collector whose counters and histograms cost less apart than with its gauges (the
    drift recorders, whose gauges are scores computed at each collect)."""

    def collect_cumulative(self) -> Iterable[Metric]:
        """Its counter and histogram families, as collect() would have them."""
        ...


class TraceLink(msgspec.Struct, array_like=True, frozen=True):
    """A sample's exemplar: the trace of one observation in its bucket."""

    labels: dict[str, str]
    value: float
    timestamp: float | None


class Sample(msgspec.Struct, array_like=True, frozen=True):
    name: str
    labels: dict[str, str]
    value: float
    exemplar: TraceLink | None = None


class Family(msgspec.Struct, array_like=True, frozen=True):
    name: str
    type: str
    documentation: str
    policy: Policy  # how its samples merge with another process's
    samples: list[Sample]


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[Family]).decode


class SnapshotRegistry(CollectorRegistry):
    """A worker's registry: it notes the merge policy of each Gauge registered, from its
    multiprocess_mode, for the snapshots."""

    def __init__(self) -> None:
        super().__init__()
        self.policies: dict[str, Policy] = {}
        # How each collector's counters and histograms are collected, in the order registered
        # (as collect() calls them), decided once: a worker collects them every second.
        self._counts: dict[Collector, Callable[[], Iterable[Metric]]] = {}

    def register(self, collector: Collector) -> None:
        if not isinstance(collector, Gauge):
            super().register(collector)
            self._counts[collector] = (
                collector.collect_cumulative
                if isinstance(collector, CountingCollector)
                else functools.partial(_cumulative_of, collector)
            )
            return
        mode = collector._multiprocess_mode
        policy = MODE_POLICY.get(mode)
        if policy is None:  # a mistake in a gauge's declaration: say so at start-up
            msg = (
                f"multiprocess_mode {mode!r} of a gauge cannot be merged across workers; "
                f"use one of {', '.join(MODE_POLICY)}"
            )
            raise ValueError(msg)
        super().register(collector)
        self.policies.update((family.name, policy) for family in collector.describe())

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self._counts.pop(collector, None)

    def collect_cumulative(self) -> Iterator[Metric]:
        """The counter and histogram families of every collector, without its gauges (from
        collect_cumulative where a collector has it, so its gauges cost nothing)."""
        for collect in list(self._counts.values()):
            yield from collect()


def _cumulative_of(collector: Collector) -> list[Metric]:
    return [metric for metric in collector.collect() if metric.type in CUMULATIVE]


def snapshot_of(registry: SnapshotRegistry) -> bytes:
    """What `registry` exports now, as a whole snapshot."""
    return _encode(families_of([registry], registry.policies))


def counts_of(registry: SnapshotRegistry) -> bytes:
    """The counters and histograms `registry` exports now, as a snapshot of counts."""
    return _encode(_families(registry.collect_cumulative(), {}))


def families_of(
    collectors: Iterable[Collector], policies: Mapping[str, Policy] | None = None
) -> list[Family]:
    """The families `collectors` export now; a gauge's policy from `policies`, else from
    GAUGE_MERGE, else "max"."""
    return _families(
        (metric for collector in collectors for metric in collector.collect()), policies or {}
    )


def _families(metrics: Iterable[Metric], policies: Mapping[str, Policy]) -> list[Family]:
    return [
        Family(
            metric.name,
            metric.type,
            metric.documentation,
            _policy(metric, policies),
            [Sample(s.name, s.labels, s.value, _link(s.exemplar)) for s in metric.samples],
        )
        for metric in metrics
    ]


def _policy(metric: Metric, policies: Mapping[str, Policy]) -> Policy:
    if metric.type in CUMULATIVE:
        return "sum"
    return policies.get(metric.name) or GAUGE_MERGE.get(metric.name, "max")


def _link(exemplar: Exemplar | None) -> TraceLink | None:
    if exemplar is None:
        return None
    timestamp = None if exemplar.timestamp is None else float(exemplar.timestamp)
    return TraceLink(exemplar.labels, exemplar.value, timestamp)


def merge(sources: Iterable[Sequence[Family]]) -> list[Family]:
    """Merge families of the same name from several processes, sample by (name, labels)."""
    kinds: dict[str, Family] = {}
    merged: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for source in sources:
        for family in source:
            first = kinds.setdefault(family.name, family)
            samples = merged.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                held = samples.get(key)
                samples[key] = sample if held is None else _combine(first, held, sample)
    return [
        Family(
            name,
            kinds[name].type,
            kinds[name].documentation,
            kinds[name].policy,
            list(samples.values()),
        )
        for name, samples in merged.items()
    ]


def cumulative(families: Iterable[Family]) -> list[Family]:
    """The families that outlive their process: counters and histograms."""
    return [family for family in families if family.type in CUMULATIVE]


def _combine(family: Family, held: Sample, sample: Sample) -> Sample:
    policy = family.policy
    if family.type in CUMULATIVE and sample.name == family.name + "_created":
        policy = "min"  # when it was created: the pod's began with its first worker's
    value = _COMBINE[policy](held.value, sample.value)
    return Sample(held.name, held.labels, value, _newer(held.exemplar, sample.exemplar))


_COMBINE: dict[Policy, Callable[[float, float], float]] = {
    "sum": operator.add,
    "max": max,
    "min": min,
}


def _newer(held: TraceLink | None, link: TraceLink | None) -> TraceLink | None:
    """A bucket's exemplar is its latest observation's, as in one process."""
    if held is None or link is None:
        return held or link
    return link if (link.timestamp or 0.0) > (held.timestamp or 0.0) else held


class SnapshotMerge(Collector):
    """The supervisor's view of its workers: the latest snapshots of each running worker (`put`,
    `put_counts`), the counters and histograms of those that have exited (`retire`), and its own
    local collectors (`own`: its process figures, which belong to the pod's total like the
    workers', and what it counts itself, such as labels posted to it; a SnapshotRegistry among
    them says how its gauges merge, as a worker's does).

    Snapshots are decoded when they are needed (a scrape, a worker's exit), not as they arrive:
    each worker sends one a second, and most are replaced by the next unread."""

    def __init__(self, own: Sequence[Collector] = ()) -> None:
        self._own = own
        self._own_policies = {
            name: policy
            for collector in own
            if isinstance(collector, SnapshotRegistry)
            for name, policy in collector.policies.items()
        }
        self._live: dict[int, _Latest] = {}  # by worker pid
        self._retired: list[Family] = []
        self._complaints = RateLimitedLog(log)

    def put(self, worker: int, snapshot: bytes) -> None:
        """The latest whole snapshot of `worker`: it replaces everything before it."""
        latest = self._live.setdefault(worker, _Latest())
        latest.whole, latest.counts = snapshot, None

    def put_counts(self, worker: int, snapshot: bytes) -> None:
        """The latest counts of `worker`: its counters and histograms, newer than its gauges."""
        self._live.setdefault(worker, _Latest()).counts = snapshot

    def retire(self, worker: int) -> None:
        """`worker` has exited: keep the counters and histograms of its last snapshot, forget
        its gauges."""
        latest = self._live.pop(worker, None)
        if latest is not None:
            self._retired = merge([self._retired, cumulative(self._read(worker, latest))])

    def collect(self) -> Iterable[Metric]:
        own = families_of(self._own, self._own_policies)
        live = [self._read(worker, latest) for worker, latest in self._live.items()]
        return [_metric(family) for family in merge([self._retired, own, *live])]

    def _read(self, worker: int, latest: _Latest) -> list[Family]:
        """What the snapshots of `worker` say, the unread ones decoded and merged in; one that
        does not decode leaves what was there before it."""
        whole, counts = latest.whole, latest.counts
        latest.whole = latest.counts = None
        if whole is not None and (families := self._decode(worker, whole)) is not None:
            latest.families = {family.name: family for family in families}
        if counts is not None and (families := self._decode(worker, counts)) is not None:
            latest.families.update((family.name, family) for family in families)
        return list(latest.families.values())

    def _decode(self, worker: int, snapshot: bytes) -> list[Family] | None:
        try:
            return _decode(snapshot)
        except msgspec.DecodeError as exc:  # a worker of another sidecar version, say
            self._complaints.warning(
                "decode", "a worker's metrics snapshot is unreadable", pid=worker, error=str(exc)
            )
            return None


class _Latest:
    """One worker's snapshots as the supervisor holds them: what it has decoded (by family
    name), and what arrived since, unread: a whole snapshot, and counts newer than it."""

    __slots__ = ("counts", "families", "whole")

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}
        self.whole: bytes | None = None
        self.counts: bytes | None = None


def _metric(family: Family) -> Metric:
    metric = Metric(family.name, family.documentation, family.type)
    for sample in family.samples:
        link = sample.exemplar
        exemplar = None if link is None else Exemplar(link.labels, link.value, link.timestamp)
        metric.add_sample(sample.name, sample.labels, sample.value, exemplar=exemplar)
    return metric
