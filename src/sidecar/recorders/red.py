"""Request-level metrics (rate, errors, duration, sizes) for every exchange, app errors kept apart
from the proxy's own."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar.exchange import Exchange
from sidecar.recorders.batch import observe_many
from sidecar.recorders.labels import Children

MODEL_LABELS = ("model_name", "model_version")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
SIZE_BUCKETS = tuple(float(4**k * 64) for k in range(11))  # 64 B ... 64 MiB

# Fewer exchanges than this are recorded one by one: numpy's set-up costs more than it saves.
_FEW = 8

_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def error_type(status: int, error: str | None) -> str | None:
    """The proxy's own failure if there was one, else the upstream's status class."""
    if error is not None:
        return error
    if status >= 500:
        return "upstream_5xx"
    if status >= 400:
        return "client_4xx"
    return None


class RedRecorder:
    """Owns the RED series. Label children are bound once per label set and reused."""

    def __init__(self, registry: CollectorRegistry) -> None:
        route_labels = [*MODEL_LABELS, "route"]
        self._requests = Children(
            Counter(
                "ml_requests_total",
                "Requests relayed, by route, method and the status code the client got.",
                [*route_labels, "method", "code"],
                registry=registry,
            )
        )
        self._errors = Children(
            Counter(
                "ml_errors_total",
                "Failed requests by error_type: upstream_5xx and client_4xx are the model "
                "server's answers; upstream_* and client_disconnect are failures the proxy saw; "
                "request_parse, response_parse and mapping are instrumentation failures (the "
                "reply was unaffected).",
                [*route_labels, "error_type"],
                registry=registry,
            )
        )
        self._duration = Histogram(
            "ml_request_duration_seconds",
            "End-to-end time in the sidecar, from request arrival to the last byte sent.",
            route_labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._upstream = Histogram(
            "ml_upstream_duration_seconds",
            "Time from sending the request upstream to its last response byte.",
            route_labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._overhead = Histogram(
            "sidecar_overhead_seconds",
            "Time the proxy hop adds: end-to-end time minus upstream time.",
            MODEL_LABELS,
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self._request_size = Histogram(
            "ml_request_size_bytes",
            "Request body size.",
            route_labels,
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self._response_size = Histogram(
            "ml_response_size_bytes",
            "Response body size.",
            route_labels,
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self._in_progress = Gauge(
            "ml_requests_in_progress",
            "Requests received and not yet answered.",
            MODEL_LABELS,
            multiprocess_mode="livesum",  # --workers: the pod's in flight; a dead worker's are gone
            registry=registry,
        )
        self._per_route: dict[tuple[str, str, str], _RouteChildren] = {}

    def in_flight(self, model: tuple[str, str]) -> Callable[[float], None]:
        """What adds to the model's in-flight gauge: the bound child's public `inc`. The pipeline
        calls it once per route at each drain (arrivals less ends), not per request, so the
        label check `Gauge.inc()` repeats (~0.1 µs) costs nothing worth reaching past it."""
        child: Gauge = self._in_progress.labels(*model)
        return child.inc

    def record(self, model: tuple[str, str], route: str, exchange: Exchange) -> None:
        children = self._children(model, route)
        children.duration.observe(exchange.total_seconds)
        children.request_size.observe(exchange.request_size)
        if exchange.upstream_seconds > 0:
            children.upstream.observe(exchange.upstream_seconds)
            children.response_size.observe(exchange.response_size)
            children.overhead.observe(max(exchange.total_seconds - exchange.upstream_seconds, 0.0))
        method = exchange.method if exchange.method in _KNOWN_METHODS else "OTHER"
        self._requests(*model, route, method, str(exchange.status)).inc()
        failure = error_type(exchange.status, exchange.error)
        if failure is not None:
            self.count_error(model, route, failure)

    def record_many(
        self, model: tuple[str, str], route: str, exchanges: Sequence[Exchange]
    ) -> None:
        """`record` for many exchanges of one route: one update per histogram bucket and one
        increment per distinct status, instead of one per exchange."""
        if len(exchanges) < _FEW:
            for exchange in exchanges:
                self.record(model, route, exchange)
            return
        n = len(exchanges)
        total = np.fromiter((e.total_seconds for e in exchanges), np.float64, n)
        upstream = np.fromiter((e.upstream_seconds for e in exchanges), np.float64, n)
        request_size = np.fromiter((e.request_size for e in exchanges), np.float64, n)
        children = self._children(model, route)
        observe_many(children.duration, total)
        observe_many(children.request_size, request_size)
        answered = upstream > 0
        if answered.any():
            response_size = np.fromiter((e.response_size for e in exchanges), np.float64, n)
            observe_many(children.upstream, upstream[answered])
            observe_many(children.response_size, response_size[answered])
            observe_many(children.overhead, np.maximum(total - upstream, 0.0)[answered])
        outcomes = Tally((e.method, e.status, e.error) for e in exchanges)
        for (method, status, error), count in outcomes.items():
            label = method if method in _KNOWN_METHODS else "OTHER"
            self._requests(*model, route, label, str(status)).inc(count)
            failure = error_type(status, error)
            if failure is not None:
                self.count_error(model, route, failure, count)

    def count_error(self, model: tuple[str, str], route: str, failure: str, count: int = 1) -> None:
        self._errors(*model, route, failure).inc(count)

    def _children(self, model: tuple[str, str], route: str) -> _RouteChildren:
        key = (*model, route)
        children = self._per_route.get(key)
        if children is None:
            children = self._per_route[key] = _RouteChildren(
                duration=self._duration.labels(*key),
                upstream=self._upstream.labels(*key),
                request_size=self._request_size.labels(*key),
                response_size=self._response_size.labels(*key),
                overhead=self._overhead.labels(*model),
            )
        return children


class _RouteChildren(NamedTuple):
    duration: Histogram
    upstream: Histogram
    request_size: Histogram
    response_size: Histogram
    overhead: Histogram
