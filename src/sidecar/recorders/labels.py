"""Bounded label values: payload-derived values beyond a cap fold into one `__other__` series."""

from __future__ import annotations

from collections.abc import Collection
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics import MetricWrapperBase

OTHER = "__other__"


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
