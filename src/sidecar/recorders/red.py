"""Request-level metrics (rate, errors, duration, sizes) for every exchange, app errors kept apart
from the proxy's own."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar.buckets import DEFAULT_BUCKETS
from sidecar.exchange import Exchange
from sidecar.recorders.batch import observe_many, set_exemplars
from sidecar.recorders.labels import Children

MODEL_LABELS = ("model_name", "model_version")


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


def _code(status: int, grpc_status: str | None) -> str:
    """The `code` label: the HTTP status, or a gRPC call's status name."""
    return str(status) if grpc_status is None else grpc_status


class RedRecorder:
    """Owns the RED series. Label children are bound once per label set and reused."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        buckets: Mapping[str, Sequence[float]] = DEFAULT_BUCKETS,
    ) -> None:
        route_labels = [*MODEL_LABELS, "route"]
        self._requests = Children(
            Counter(
                "ml_requests_total",
                "Requests relayed, by route, method and the status code the client got (a gRPC "
                "call's status name, e.g. OK or UNAVAILABLE).",
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
            buckets=buckets["ml_request_duration_seconds"],
            unit="seconds",
            registry=registry,
        )
        self._upstream = Histogram(
            "ml_upstream_duration_seconds",
            "Time from sending the request upstream to its last response byte.",
            route_labels,
            buckets=buckets["ml_upstream_duration_seconds"],
            unit="seconds",
            registry=registry,
        )
        self._overhead = Histogram(
            "sidecar_overhead_seconds",
            "Time the proxy hop adds: end-to-end time minus upstream time.",
            MODEL_LABELS,
            buckets=buckets["sidecar_overhead_seconds"],
            unit="seconds",
            registry=registry,
        )
        self._request_size = Histogram(
            "ml_request_size_bytes",
            "Request body size.",
            route_labels,
            buckets=buckets["ml_request_size_bytes"],
            unit="bytes",
            registry=registry,
        )
        self._response_size = Histogram(
            "ml_response_size_bytes",
            "Response body size.",
            route_labels,
            buckets=buckets["ml_response_size_bytes"],
            unit="bytes",
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
        # A traced request links its latency buckets to its trace (OpenMetrics exemplars).
        exemplar = {"trace_id": exchange.trace_id} if exchange.trace_id else None
        children.duration.observe(exchange.total_seconds, exemplar)
        children.request_size.observe(exchange.request_size)
        if exchange.upstream_seconds > 0:
            children.upstream.observe(exchange.upstream_seconds, exemplar)
            children.response_size.observe(exchange.response_size)
            children.overhead.observe(max(exchange.total_seconds - exchange.upstream_seconds, 0.0))
        method = exchange.method if exchange.method in _KNOWN_METHODS else "OTHER"
        self._requests(*model, route, method, _code(exchange.status, exchange.grpc_status)).inc()
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
        traced = [(e, e.trace_id) for e in exchanges if e.trace_id is not None]
        if traced:
            set_exemplars(children.duration, [(e.total_seconds, tid) for e, tid in traced])
            set_exemplars(
                children.upstream,
                [(e.upstream_seconds, tid) for e, tid in traced if e.upstream_seconds > 0],
            )
        outcomes = Tally((e.method, e.status, e.grpc_status, e.error) for e in exchanges)
        for (method, status, grpc_status, error), count in outcomes.items():
            label = method if method in _KNOWN_METHODS else "OTHER"
            self._requests(*model, route, label, _code(status, grpc_status)).inc(count)
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
