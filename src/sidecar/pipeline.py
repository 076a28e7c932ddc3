"""From exchange to metrics: route, label, record the request at once, extract and record the
payload later, off the reply path, through a bounded queue whose drops are counted."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from sidecar import __version__
from sidecar.config import Config
from sidecar.exchange import Exchange
from sidecar.extract.types import Message
from sidecar.logs import RateLimitedLog
from sidecar.recorders.labels import LabelCap, OverflowCounter
from sidecar.recorders.outputs import OutputRecorder
from sidecar.recorders.quality import QualityRecorder
from sidecar.recorders.red import MODEL_LABELS, RedRecorder
from sidecar.routes import Route, RouteTable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ticket:
    route: Route
    model: tuple[str, str]
    capture_bodies: bool


class Pipeline:
    """The proxy's ExchangeObserver. Nothing in here may fail a request: errors become metrics."""

    def __init__(self, config: Config, routes: RouteTable, registry: CollectorRegistry) -> None:
        self._config = config
        self._routes = routes
        self._red = RedRecorder(registry)
        overflow = OverflowCounter(registry)
        self._outputs = OutputRecorder(
            registry,
            overflow=overflow,
            label_cap=config.label_cap,
            low_confidence_threshold=config.low_confidence_threshold,
        )
        self._quality = QualityRecorder(
            registry, rules=config.features, overflow=overflow, label_cap=config.label_cap
        )
        self._model_names = LabelCap(
            "model_name", limit=config.label_cap, overflow=overflow, allowed=config.model_names
        )
        self._model_versions = LabelCap("model_version", limit=config.label_cap, overflow=overflow)
        self._dropped = Counter(
            "sidecar_dropped_observations_total",
            "Exchanges whose payloads were not parsed: queue_full (recording fell behind) or "
            "body_too_large (over max_body_bytes; the request itself passed through).",
            ["reason"],
            registry=registry,
        )
        self._pending: deque[tuple[Ticket, Exchange]] = deque()
        self._drain_scheduled = False
        self._complaints = RateLimitedLog(log)
        _publish_model_info(config, registry)

    def reconfigure(self, config: Config, routes: RouteTable) -> None:
        """Apply a reloaded config: new routes and extractors, thresholds and feature rules.

        Requests already in flight finish with the route they started with.
        """
        self._config = config
        self._routes = routes
        self._outputs.low_confidence_threshold = config.low_confidence_threshold
        self._quality.rules = config.features

    def begin(self, method: str, path: str) -> Ticket:
        route, params = self._routes.match(method, path)
        model = self._model_labels(params)
        self._red.in_progress(model).inc()
        return Ticket(route, model, capture_bodies=route.extractor is not None)

    def end(self, ticket: Ticket, exchange: Exchange) -> None:
        self._red.in_progress(ticket.model).dec()
        try:
            self._red.record(ticket.model, ticket.route.name, exchange)
        except Exception:  # instrumentation never fails a request
            self._complaints.warning("record", "recording a request failed", exc_info=True)
        if ticket.capture_bodies and 200 <= exchange.status < 300 and exchange.error is None:
            self._enqueue(ticket, exchange)

    def _enqueue(self, ticket: Ticket, exchange: Exchange) -> None:
        if exchange.truncated:
            self._dropped.labels("body_too_large").inc()
            return
        if len(self._pending) >= self._config.record_queue_size:
            self._dropped.labels("queue_full").inc()
            return
        self._pending.append((ticket, exchange))
        if not self._drain_scheduled:
            # Parse after the reply is flushed and the handler has returned: the client must not
            # wait for metrics, and the connection is free for its next request.
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        while self._pending:
            ticket, exchange = self._pending.popleft()
            try:
                self._observe_payload(ticket, exchange)
            except Exception:  # a recorder bug must not stop the others
                self._complaints.warning("extract", "payload recording failed", exc_info=True)

    def _observe_payload(self, ticket: Ticket, exchange: Exchange) -> None:
        extractor = ticket.route.extractor
        if extractor is None or exchange.request_body is None or exchange.response_body is None:
            return
        extraction = extractor(
            Message(exchange.request_body, exchange.request_headers),
            Message(exchange.response_body, exchange.response_headers),
        )
        for failure in extraction.errors:
            self._red.count_error(ticket.model, ticket.route.name, failure)
            self._complaints.warning(
                failure, "payload could not be read", route=ticket.route.name, error_type=failure
            )
        self._outputs.record(ticket.model, ticket.route.name, extraction)
        if extraction.features is not None:
            self._quality.record(ticket.model, extraction.features)

    def _model_labels(self, params: Mapping[str, str]) -> tuple[str, str]:
        name = params.get("model")
        version = params.get("version")
        return (
            self._model_names.fold(name) if name else self._config.model_name,
            self._model_versions.fold(version) if version else self._config.model_version,
        )


def _publish_model_info(config: Config, registry: CollectorRegistry) -> None:
    info = Gauge(
        "ml_model_info",
        "Always 1; labels describe the model and the sidecar in front of it.",
        [*MODEL_LABELS, "framework", "sidecar_version", "reference_profile"],
        registry=registry,
    )
    info.labels(config.model_name, config.model_version, config.framework, __version__, "").set(1)
