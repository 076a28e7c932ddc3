"""Label values and series: payload-derived values beyond a cap fold into one `__other__` series,
and a series born between two scrapes still has every count reach Prometheus (SeriesBirths)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Generic, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

OTHER = "__other__"

PROMETHEUS_SCRAPE = b"x-prometheus-scrape-timeout-seconds"
"""The header Prometheus (and agents built on its scrape code) sends with every scrape."""


M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """A labelled metric's children, bound once per label values: `labels()` validates and takes
    a lock on every call, a dict lookup does not. Callers cap the values, so this is bounded."""

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._bound: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._bound.get(values)
        if child is None:
            child = self._bound[values] = self._metric.labels(*values)
        return child


class OverflowCounter:
    """`sidecar_label_overflow_total{label}`: how often a value was folded because a cap was hit."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counter = Counter(
            "sidecar_label_overflow_total",
            "Label values folded into __other__ because the cap of distinct values was hit.",
            ["label"],
            registry=registry,
        )

    def for_label(self, label: str) -> Counter:
        return self._counter.labels(label)


class LabelCap:
    """Admit at most `limit` distinct values for one label (or only `allowed` ones, when given).

    >>> cap = LabelCap("class", limit=2, overflow=None)
    >>> [cap.fold(v) for v in ("a", "b", "c", "a")]
    ['a', 'b', '__other__', 'a']
    """

    __slots__ = ("_allowed", "_limit", "_overflow", "_seen")

    def __init__(
        self,
        label: str,
        *,
        limit: int,
        overflow: OverflowCounter | None,
        allowed: Collection[str] = (),
    ) -> None:
        self._limit = limit
        self._allowed = frozenset(allowed)
        self._seen: set[str] = set()
        self._overflow = overflow.for_label(label) if overflow is not None else None

    def fold(self, value: str) -> str:
        if value in self._seen:
            return value
        admitted = value in self._allowed if self._allowed else len(self._seen) < self._limit
        if admitted:
            self._seen.add(value)
            return value
        if self._overflow is not None:
            self._overflow.inc()
        return OTHER


# --- series births ------------------------------------------------------------------------------
#
# increase() and rate() count what a counter gained between samples: the value of a series at its
# first sample is taken as its starting point, not as counts. A series whose first increments
# come before Prometheus first scrapes it (a model named by a request path, a confusion-matrix
# cell born with its first label, every series of a process that took traffic before its first
# scrape) would lose those counts from every windowed figure. So Prometheus scrapes are shown
# each new counter and histogram series at 0 for a while, then its true value, and increase()
# counts all of it.

_CUMULATIVE = frozenset({"counter", "histogram"})
_COUNTED = ("_total", "_bucket", "_count", "_sum")  # not `_created`, the series' birth time
_GAPS = 32  # recent gaps between Prometheus scrapes that set how long a new series reads 0

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


class SeriesBirths:
    """Collects `source` for Prometheus scrapes, showing every new counter or histogram series at
    0 until each of its scrapers has seen that 0.

    Prometheus takes a series' first sample as its starting point, so that sample must be 0 for
    the counts made before it to count. A new series reads 0 from the first Prometheus scrape
    that finds it until twice the usual gap between Prometheus scrapes has passed (the upper
    quartile of the last 32 gaps, so one late scrape, after an outage, does not count): one
    scraper sees it at 0 twice, and two scrapers of the same interval (a Prometheus HA pair, or
    one sidecar in two jobs), whatever their phases, once each at least. Nothing is held back in
    the counters themselves, only in what the scrape is shown, so every exposition path (one
    process, or a supervisor's merge of its workers' snapshots) gets the guarantee by being
    scraped through this. Thread-safe.

    >>> from prometheus_client import CollectorRegistry, Counter
    >>> registry = CollectorRegistry()
    >>> Counter("rows", "Rows.", registry=registry).inc(5)
    >>> now = [0.0]
    >>> births = SeriesBirths(registry, clock=lambda: now[0])
    >>> def rows():
    ...     found = births.scrape().collect()
    ...     now[0] += 15.0
    ...     return [s.value for m in found for s in m.samples if s.name == "rows_total"]
    >>> rows() + rows() + rows() + rows()
    [0.0, 0.0, 5.0, 5.0]
    """

    def __init__(self, source: Collector, clock: Callable[[], float] = time.monotonic) -> None:
        self._source, self._clock = source, clock
        self._shown_zero: dict[SeriesKey, float] = {}  # new series: when first shown at 0
        self._counting: set[SeriesKey] = set()  # series shown their true value
        self._gaps: deque[float] = deque(maxlen=_GAPS)
        self._last: float | None = None
        self._lock = threading.Lock()

    def scrape(self) -> Collector:
        """The source's families as this Prometheus scrape must see them."""
        families = list(self._source.collect())
        with self._lock:
            now = self._clock()
            if self._last is not None:
                self._gaps.append(now - self._last)
            self._last = now
            hold = 2.0 * float(np.quantile(self._gaps, 0.75)) if self._gaps else 0.0
            zero = self._still_zero(_series(families), now, hold)
        return Collected([_at_zero(family, zero) if zero else family for family in families])

    def _still_zero(self, keys: Iterable[SeriesKey], now: float, hold: float) -> set[SeriesKey]:
        zero = set()
        for key in keys:
            if key in self._counting:
                continue
            shown = self._shown_zero.setdefault(key, now)
            if now > shown and now - shown >= hold:
                del self._shown_zero[key]
                self._counting.add(key)
            else:
                zero.add(key)
        return zero


class Collected(Collector):
    """Families already collected, as an encoder takes them: a collector."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def _series(families: Iterable[Metric]) -> Iterator[SeriesKey]:
    for family in families:
        if family.type in _CUMULATIVE:
            for sample in family.samples:
                yield _key(family.name, sample.labels)


def _key(name: str, labels: dict[str, str]) -> SeriesKey:
    """A series of a family: its labels without `le`, so a histogram's samples share one key."""
    return name, tuple((k, v) for k, v in labels.items() if k != "le")


def _at_zero(family: Metric, zero: set[SeriesKey]) -> Metric:
    if family.type not in _CUMULATIVE:
        return family
    shown = Metric(family.name, family.documentation, family.type, family.unit)
    shown.samples = [
        sample._replace(value=0.0, exemplar=None)
        if sample.name.endswith(_COUNTED) and _key(family.name, sample.labels) in zero
        else sample
        for sample in family.samples
    ]
    return shown
