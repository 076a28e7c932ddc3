"""From exchange to metrics: route, label, record the request at once, extract and record the
payload later, off the reply path, through a bounded queue whose drops are counted. Large
payloads are read in a thread of their own (see LARGE_BODY_BYTES)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.buckets import resolve as resolve_buckets
from sidecar.config import Config
from sidecar.drift.profile import NumericFeature, Profile, content_hash
from sidecar.drift.recorder import DriftRecorder
from sidecar.exchange import Exchange
from sidecar.extract import sliced
from sidecar.extract.batch import Merged
from sidecar.extract.types import Extraction, Message
from sidecar.feedback.recorder import FeedbackRecorder
from sidecar.logs import RateLimitedLog
from sidecar.memory import young_collections_only
from sidecar.recorders.labels import OTHER, LabelCap, OverflowCounter
from sidecar.recorders.llm import LlmRecorder
from sidecar.recorders.outputs import OutputRecorder
from sidecar.recorders.quality import QualityRecorder
from sidecar.recorders.red import MODEL_LABELS, RedRecorder
from sidecar.routes import Route, RouteTable

log = logging.getLogger(__name__)
_P = ParamSpec("_P")

# Ended exchanges wait at most this long (seconds) to be recorded, or until this many are waiting.
DRAIN_DELAY = 0.010
DRAIN_NOW = 256
# Requests (method, path) remembered with their ticket; forgotten all at once beyond this many
# (paths can be endless: an id in the path, a scanner's guesses).
_REMEMBERED_PATHS = 1024
# Exchanges whose bodies add up to this many bytes are read in a thread, one at a time, a slice
# at a time (sidecar.extract.sliced), and recorded RECORD_ROWS rows per turn of the event loop.
# On the loop, 10 MB of rows took 0.3 to 1 s to read and record, which every request in flight
# waited through (benchmarks/big_bodies.sh: one-row requests beside a stream of 5 to 10 MB
# bodies had p99 0.54 to 0.59 s; 20 to 26 ms this way).
LARGE_BODY_BYTES = 256 * 1024
RECORD_ROWS = 4096  # about 1.5 ms of the recorders' work
# After each piece of that work, its thread (and the loop, between two recording steps) rests
# this many times as long: large payloads take at most a quarter of the time. At a half, one-row
# requests beside a stream of them did worse (big_bodies.sh, two interleaved runs of each: p50
# 2.1 and 3.0 ms against 1.3 and 1.5, p99 41 and 59 ms against 39 and 44).
LARGE_REST = 3


@dataclass(frozen=True, slots=True, eq=False)  # one per route and model: hashed by identity
class Ticket:
    route: Route
    model: tuple[str, str]
    in_flight: Callable[[float], None]  # adds to the model's in-flight gauge
    capture_bodies: bool
    # route.inject_usage, at hand for the proxy (sidecar.exchange.ExchangeObserver), which
    # reads it on every request and knows no Route.
    inject_usage: bool = False


class Pipeline:
    """The proxy's ExchangeObserver. Nothing in here may fail a request: errors become metrics."""

    def __init__(
        self,
        config: Config,
        routes: RouteTable,
        registry: CollectorRegistry,
        profile: Profile | None = None,
        *,
        feedback_joins: bool = True,  # False in a worker of --workers: see FeedbackRecorder
    ) -> None:
        self._config = config
        self._routes = routes
        registry.register(_FlushOnScrape(self))  # first: it runs before the others are collected
        buckets = resolve_buckets(config.buckets, _value_edges(profile))
        self._red = RedRecorder(registry, buckets=buckets)
        overflow = OverflowCounter(registry)
        self._outputs = OutputRecorder(
            registry,
            overflow=overflow,
            label_cap=config.label_cap,
            low_confidence_threshold=config.low_confidence_threshold,
            buckets=buckets,
        )
        self._quality = QualityRecorder(
            registry, rules=config.features, overflow=overflow, label_cap=config.label_cap
        )
        self._model_names = LabelCap(
            "model_name", limit=config.label_cap, overflow=overflow, allowed=config.model_names
        )
        self._model_versions = LabelCap("model_version", limit=config.label_cap, overflow=overflow)
        self._llm = LlmRecorder(
            registry, overflow=overflow, label_cap=config.label_cap, buckets=buckets
        )
        self._tickets: dict[tuple[Route, tuple[str, str]], Ticket] = {}  # Tickets are immutable
        self._by_path: dict[tuple[str, str], Ticket] = {}  # begin()'s memory, see _ticket()
        self._by_call: dict[tuple[str, str | None, str | None], Ticket] = {}  # begin_call()'s
        self._dropped = dropped_counter(registry)
        self._profile = profile
        self._drift = DriftByModel()
        registry.register(self._drift)
        self._drift_for((config.model_name, config.model_version))  # its series exist from start
        self.feedback = FeedbackRecorder(
            registry, config, dropped=self._dropped, overflow=overflow, joins=feedback_joins
        )
        # Exchanges ended since the last drain, and whether their payloads are to be read; the
        # requests begun since then, per ticket.
        self._pending: list[tuple[Ticket, Exchange, bool]] = []
        self._arrived: dict[Ticket, int] = {}
        self._queued_payloads = 0  # bounded by record_queue_size; the rest are counted as dropped
        self._drain_handle: asyncio.Handle | None = None
        self._complaints = RateLimitedLog(log)
        # Large exchanges: their thread (started with the first), and the bytes of their bodies
        # from the moment they are handed over until they are recorded.
        self._large_reader: ThreadPoolExecutor | None = None
        self._large_bytes = 0
        self._recordings: deque[tuple[Iterator[None], int]] = deque()  # read, being recorded
        self._large_complaints = RateLimitedLog(log)  # the thread's own: no state shared
        _publish_model_info(config, registry, profile)

    def reconfigure(self, config: Config, routes: RouteTable) -> None:
        """Apply a reloaded config: new routes and extractors, thresholds and feature rules.

        Requests already in flight finish with the route they started with.
        """
        self._config = config
        self._routes = routes
        self._tickets = {}
        self._by_path = {}
        self._by_call = {}
        self._outputs.low_confidence_threshold = config.low_confidence_threshold
        self._quality.rules = config.features

    def begin(self, method: str, path: str) -> Ticket:
        ticket = self._by_path.get((method, path))
        if ticket is None:
            ticket = self._ticket(method, path)
        # The in-flight gauge moves at the drain, by each route's arrivals less its ends: a
        # gauge update takes a lock and is made per drain, not twice per request. A scrape
        # drains first, so it never sees the difference.
        self._arrived[ticket] = self._arrived.get(ticket, 0) + 1
        self._drain_later()
        return ticket

    def begin_call(self, path: str, model_name: str | None, model_version: str | None) -> Ticket:
        """begin() for a gRPC call: its path names the method (and so the route), the message
        names the model (sidecar.proxy.grpc_relay reads it)."""
        key = (path, model_name, model_version)
        ticket = self._by_call.get(key)
        if ticket is None:
            route, _ = self._routes.match("POST", path)
            params = {"model": model_name or "", "version": model_version or ""}
            ticket = self._route_ticket(route, self._model_labels(params))
            if OTHER not in ticket.model:  # as in _ticket()
                if len(self._by_call) >= _REMEMBERED_PATHS:
                    self._by_call.clear()
                self._by_call[key] = ticket
        self._arrived[ticket] = self._arrived.get(ticket, 0) + 1
        self._drain_later()
        return ticket

    def _ticket(self, method: str, path: str) -> Ticket:
        """Route and label a request. A model's traffic hits few paths, so the answer is
        remembered per path: matching route patterns costs more than the rest of begin()."""
        route, params = self._routes.match(method, path)
        ticket = self._route_ticket(route, self._model_labels(params))
        # A label folded into __other__ is counted as an overflow on every request: not cached.
        if OTHER not in ticket.model:
            if len(self._by_path) >= _REMEMBERED_PATHS:
                self._by_path.clear()
            self._by_path[(method, path)] = ticket
        return ticket

    def _route_ticket(self, route: Route, model: tuple[str, str]) -> Ticket:
        ticket = self._tickets.get((route, model))
        if ticket is None:  # bounded: routes times capped model labels
            ticket = self._tickets[(route, model)] = Ticket(
                route,
                model,
                self._red.in_flight(model),
                capture_bodies=route.extractor is not None,
                inject_usage=route.inject_usage,
            )
        return ticket

    def end(self, ticket: Ticket, exchange: Exchange) -> None:
        wanted = ticket.capture_bodies and (
            (200 <= exchange.status < 300 and exchange.error is None)
            or (ticket.route.generative and _cut_short(exchange))  # counted in _observe_payload
        )
        if wanted and exchange.truncated:
            self._dropped.labels("body_too_large").inc()
            wanted = False
        elif (
            wanted
            and exchange.error is None
            and (size := _body_bytes(exchange)) >= LARGE_BODY_BYTES
        ):
            self._read_large(ticket, exchange, size)
            wanted = False  # recorded when its thread has read it
        elif wanted and self._queued_payloads >= self._config.record_queue_size:
            self._dropped.labels("queue_full").inc()
            wanted = False
        self._queued_payloads += wanted
        self._pending.append((ticket, exchange, wanted))
        # Record after the reply is flushed and the handler has returned: the client must not
        # wait for metrics, and the connection is free for its next request. Exchanges that end
        # within DRAIN_DELAY are recorded together, which is much cheaper per exchange.
        if len(self._pending) == DRAIN_NOW and self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = asyncio.get_running_loop().call_soon(self._drain)
        else:
            self._drain_later()

    def _drain_later(self) -> None:
        """A drain within DRAIN_DELAY, unless one is due already."""
        if self._drain_handle is None:
            self._drain_handle = asyncio.get_running_loop().call_later(DRAIN_DELAY, self._drain)

    def flush(self) -> None:
        """Record every exchange that has ended (a scrape must see all of them)."""
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain()

    def _drain(self) -> None:
        self._drain_handle = None
        pending, self._pending = self._pending, []
        arrived, self._arrived = self._arrived, {}
        self._queued_payloads = 0
        # Tickets are shared by the exchanges of one route and model (see begin()).
        groups: dict[Ticket, list[tuple[Exchange, bool]]] = {}
        for ticket, exchange, wanted in pending:
            groups.setdefault(ticket, []).append((exchange, wanted))
        for ticket in arrived.keys() | groups.keys():
            change = arrived.get(ticket, 0) - len(groups.get(ticket, ()))
            if change:
                ticket.in_flight(change)
        for ticket, items in groups.items():
            try:
                self._red.record_many(ticket.model, ticket.route.name, [e for e, _ in items])
            except Exception:  # instrumentation never fails a request
                self._complaints.warning("record", "recording requests failed", exc_info=True)
            payloads = [exchange for exchange, wanted in items if wanted]
            if payloads:
                self._observe_payloads(ticket, payloads)

    def _observe_payloads(self, ticket: Ticket, exchanges: list[Exchange]) -> None:
        """Read the payloads of one route's exchanges: together where the route's plan can
        (sidecar.extract.batch), one by one otherwise."""
        read_many = ticket.route.batch
        if read_many is None or len(exchanges) < 2:
            for exchange in exchanges:
                self._guarded(self._observe_payload, ticket, exchange)
            return
        readable = [(e, m) for e in exchanges if (m := _messages(e)) is not None]
        try:
            batch = read_many([messages for _, messages in readable])
        except Exception:  # a reader bug must not stop the recorders
            self._complaints.warning("extract", "payload recording failed", exc_info=True)
            return
        if batch.merged is not None:
            members = [readable[position][0] for position in batch.merged.members]
            self._guarded(self._record_merged, ticket, batch.merged, members)
        for position, extraction in batch.alone:
            self._guarded(self._record, ticket, readable[position][0], extraction)

    def _guarded(self, record: Callable[_P, None], *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            record(*args, **kwargs)
        except Exception:  # a recorder bug must not stop the others
            self._complaints.warning("extract", "payload recording failed", exc_info=True)

    def _record_merged(self, ticket: Ticket, merged: Merged, members: list[Exchange]) -> None:
        extraction = merged.extraction
        self._outputs.record(ticket.model, ticket.route.name, extraction.outputs, merged.row_counts)
        self.feedback.record_merged(
            ticket.model,
            extraction,
            (  # lazily: read only if predictions are logged
                (exchange.request_id, exchange.total_seconds, rows)
                for exchange, rows in zip(members, merged.row_counts, strict=True)
            ),
        )
        self._record_features(ticket.model, extraction)

    def _observe_payload(self, ticket: Ticket, exchange: Exchange) -> None:
        if exchange.error is not None:  # an LLM call cut short (see end())
            self._record_abort(ticket, exchange)
            return
        extractor = ticket.route.extractor
        messages = _messages(exchange)
        if extractor is not None and messages is not None:
            self._record(ticket, exchange, extractor(*messages))

    def _record(self, ticket: Ticket, exchange: Exchange, extraction: Extraction) -> None:
        """Record what one exchange yielded."""
        self._record_exchange(ticket, exchange, extraction)
        self._record_rows(ticket, extraction, (extraction.batch_size,))

    def _record_exchange(self, ticket: Ticket, exchange: Exchange, extraction: Extraction) -> None:
        """What is recorded once per exchange: failures, predictions for the log, LLM usage."""
        for failure in extraction.errors:
            self._red.count_error(ticket.model, ticket.route.name, failure)
            self._complaints.warning(
                failure, "payload could not be read", route=ticket.route.name, error_type=failure
            )
        self.feedback.record(ticket.model, exchange.request_id, extraction, exchange.total_seconds)
        if extraction.generation is not None:
            model = self._llm_model(ticket, extraction)
            self._llm.record(model, ticket.route.name, extraction.generation)

    def _record_rows(
        self, ticket: Ticket, extraction: Extraction, batch_sizes: tuple[int, ...]
    ) -> None:
        """What is recorded per row: outputs, data quality, drift (and the batch sizes given)."""
        self._outputs.record(ticket.model, ticket.route.name, extraction.outputs, batch_sizes)
        self._record_features(ticket.model, extraction)

    # Large exchanges

    def _read_large(self, ticket: Ticket, exchange: Exchange, size: int) -> None:
        """Hand a large exchange (`size` body bytes) to its thread, unless large_body_queue_bytes
        are waiting there already (one is always taken: a thread with nothing to do takes any
        size)."""
        if self._large_bytes and self._large_bytes + size > self._config.large_body_queue_bytes:
            self._dropped.labels("large_body_queue_full").inc()
            return
        if self._large_reader is None:
            self._large_reader = ThreadPoolExecutor(1, thread_name_prefix="sidecar-large")
        self._large_bytes += size
        loop = asyncio.get_running_loop()
        self._large_reader.submit(self._read_in_thread, loop, ticket, exchange, size)

    def _read_in_thread(
        self, loop: asyncio.AbstractEventLoop, ticket: Ticket, exchange: Exchange, size: int
    ) -> None:
        """In the large exchanges' thread: read one, then have the loop record it. The
        recorders are not thread-safe, so only the loop touches them."""
        extraction = None
        extractor, messages = ticket.route.extractor, _messages(exchange)
        try:
            # reading_large() exits first: the parsed rows are freed before the collector
            # catches up with the generation it skipped meanwhile (memory.py says why).
            with young_collections_only(), sliced.reading_large(LARGE_REST):
                if extractor is not None and messages is not None:
                    extraction = extractor(*messages)
        except Exception:  # a reader bug must not stop the thread
            self._large_complaints.warning("extract", "payload reading failed", exc_info=True)
        try:
            loop.call_soon_threadsafe(self._record_large, ticket, exchange, extraction, size)
        except RuntimeError:  # the loop has closed: the sidecar has stopped
            return

    def _record_large(
        self, ticket: Ticket, exchange: Exchange, extraction: Extraction | None, size: int
    ) -> None:
        steps = iter(()) if extraction is None else self._recording(ticket, exchange, extraction)
        self._recordings.append((steps, size))
        if len(self._recordings) == 1:
            self._record_step()

    def _record_step(self) -> None:
        """One step of the oldest large exchange's recording, the next after a rest (see
        LARGE_REST); the requests that arrive meanwhile are answered in between."""
        started = time.perf_counter()
        steps, size = self._recordings[0]
        try:
            next(steps)
        except StopIteration:
            self._recordings.popleft()
            self._large_bytes -= size
        except Exception:  # a recorder bug must not stop the others
            self._complaints.warning("extract", "payload recording failed", exc_info=True)
            self._recordings.popleft()
            self._large_bytes -= size
        if self._recordings:
            rest = LARGE_REST * (time.perf_counter() - started)
            asyncio.get_running_loop().call_later(rest, self._record_step)

    def _recording(
        self, ticket: Ticket, exchange: Exchange, extraction: Extraction
    ) -> Iterator[None]:
        """_record, RECORD_ROWS rows at a time."""
        self._record_exchange(ticket, exchange, extraction)
        batch_sizes: tuple[int, ...] = (extraction.batch_size,)
        for start in range(0, max(_row_count(extraction), 1), RECORD_ROWS):
            self._record_rows(ticket, _rows(extraction, start, start + RECORD_ROWS), batch_sizes)
            batch_sizes = ()
            yield

    def _record_features(self, model: tuple[str, str], extraction: Extraction) -> None:
        """Data quality and drift, on features and outputs."""
        drift = self._drift_for(model)
        if extraction.features is not None:
            self._quality.record(model, extraction.features)
            drift.observe_features(extraction.features)
        drift.observe_outputs(extraction.outputs)

    def _record_abort(self, ticket: Ticket, exchange: Exchange) -> None:
        """Count a streamed LLM call that did not finish, under the model the request named."""
        extractor = ticket.route.extractor
        if extractor is None or exchange.request_body is None or exchange.error is None:
            return
        extraction = extractor(  # the request only: a cut reply is not read
            Message(exchange.request_body, exchange.request_headers),
            Message(b"", exchange.response_headers),
        )
        if extraction.generation is not None and extraction.generation.streamed:
            model = self._llm_model(ticket, extraction)
            self._llm.aborted(model, ticket.route.name, exchange.error)

    def _llm_model(self, ticket: Ticket, extraction: Extraction) -> tuple[str, str]:
        """LLM series carry the model the request named (capped like path names); RED series
        of the same route carry the configured model, as they are labelled before any body."""
        name = extraction.model_name
        return (self._model_names.fold(name) if name else ticket.model[0], ticket.model[1])

    def _drift_for(self, model: tuple[str, str]) -> DriftRecorder:
        """One drift recorder per model (model labels are capped, so these are too)."""
        recorder = self._drift.recorders.get(model)
        if recorder is None:
            recorder = self._drift.recorders[model] = DriftRecorder(
                self._profile,
                model_name=model[0],
                model_version=model[1],
                settings=self._config.drift,
            )
        return recorder

    def _model_labels(self, params: Mapping[str, str]) -> tuple[str, str]:
        name = params.get("model")
        version = params.get("version")
        return (
            self._model_names.fold(name) if name else self._config.model_name,
            self._model_versions.fold(version) if version else self._config.model_version,
        )


def dropped_counter(registry: CollectorRegistry) -> Counter:
    """`sidecar_dropped_observations_total`, by reason."""
    return Counter(
        "sidecar_dropped_observations_total",
        "Exchanges whose payloads were not parsed: queue_full (recording fell behind), "
        "large_body_queue_full (large payloads waiting over large_body_queue_bytes) or "
        "body_too_large (over max_body_bytes; the request itself passed through). Rows not "
        "logged: prediction_log_full (the writer fell behind), prediction_log_error. "
        "Prediction events not sent: prediction_sink_full (the CloudEvents sink fell "
        "behind), prediction_sink_error (given up after its attempts).",
        ["reason"],
        registry=registry,
    )


def _value_edges(profile: Profile | None) -> list[float]:
    """The profile's equal-mass edges of regression outputs (none without a profile)."""
    if profile is None:
        return []
    for output in profile.outputs:
        if output.name == "__value__" and isinstance(output, NumericFeature):
            return output.edges
    return []


def _messages(exchange: Exchange) -> tuple[Message, Message] | None:
    """The exchange's bodies as extraction reads them; None unless both were captured."""
    request, response = exchange.request_body, exchange.response_body
    if request is None or response is None:
        return None
    return (
        Message(request, exchange.request_headers),
        Message(response, exchange.response_headers, exchange.arrivals),
    )


def _body_bytes(exchange: Exchange) -> int:
    return len(exchange.request_body or b"") + len(exchange.response_body or b"")


def _row_count(extraction: Extraction) -> int:
    features, outputs = extraction.features, extraction.outputs
    counts = [len(a) for a in (outputs.classes, outputs.confidence, outputs.value) if a is not None]
    return max([features.n_rows if features is not None else 0, *counts])


def _rows(extraction: Extraction, start: int, stop: int) -> Extraction:
    """Rows start..stop-1 of an extraction's features and outputs."""
    features = extraction.features
    return dataclasses.replace(
        extraction,
        features=None if features is None else features.rows(start, stop),
        outputs=extraction.outputs.rows(start, stop),
    )


def _cut_short(exchange: Exchange) -> bool:
    """The client left, or the upstream broke off after its answer had begun."""
    if exchange.error == "client_disconnect":
        return True
    return exchange.error is not None and 200 <= exchange.status < 300


class _FlushOnScrape(Collector):
    """Exports nothing; being collected first, it makes every scrape include the exchanges
    still waiting for the next drain."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        self._pipeline.flush()
        return []


class DriftByModel(Collector):
    """The drift recorders of every model, exposed as one set of families: each recorder names
    the same metrics, which a registry accepts only once."""

    def __init__(self) -> None:
        self.recorders: dict[tuple[str, str], DriftRecorder] = {}

    def collect(self) -> Iterable[Metric]:
        return _merged(recorder.collect() for recorder in list(self.recorders.values()))

    def collect_cumulative(self) -> Iterable[Metric]:
        """The drift bins and PIT histograms alone (workers/snapshots.py)."""
        return _merged(recorder.collect_cumulative() for recorder in list(self.recorders.values()))


def _merged(collected: Iterable[Iterable[Metric]]) -> list[Metric]:
    """Families of the same name, from several recorders, as one."""
    merged: dict[str, Metric] = {}
    for families in collected:
        for family in families:
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = family
    return list(merged.values())


def _publish_model_info(
    config: Config, registry: CollectorRegistry, profile: Profile | None
) -> None:
    info = Gauge(
        "ml_model_info",
        "Always 1; labels describe the model and the sidecar in front of it "
        "(reference_profile: the content hash of the drift profile, empty without one).",
        [*MODEL_LABELS, "framework", "sidecar_version", "reference_profile"],
        multiprocess_mode="max",  # --workers: every worker sets the same 1
        registry=registry,
    )
    reference = content_hash(profile) if profile is not None else ""
    info.labels(
        config.model_name, config.model_version, config.framework, __version__, reference
    ).set(1)
