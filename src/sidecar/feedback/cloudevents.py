"""Prediction events to a CloudEvents HTTP endpoint, in binary content mode (docs/ground-truth.md,
*Sinks*).

One event per exchange, type `io.sidecar.prediction`, with the headers KServe's payload logger
sends (`ce-specversion`, `ce-type`, `ce-source`, `ce-id` = the request id, `ce-time`,
`ce-inferenceservicename`) and, as its JSON body, the exchange's logged rows: the objects of the
JSON Lines. Whatever takes KServe's events over HTTP (a Knative broker, a Kafka bridge) takes these.

One thread sends them, one event per HTTP request, over one keep-alive connection
(sidecar.feedback.endpoint). The event loop only appends to a bounded queue, so a receiver that is
slow or down holds up this thread, never a reply; beyond `sink_queue_size` the events are dropped
and counted. An event that fails is tried again after a backoff that doubles, up to
`sink_attempts` tries; the events behind it wait, in order.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

import httptools
import orjson
from prometheus_client import CollectorRegistry, Counter

from sidecar.feedback.endpoint import Endpoint
from sidecar.feedback.log import PendingPrediction, expand, row_record
from sidecar.feedback.settings import FeedbackSettings
from sidecar.logs import RateLimitedLog

__all__ = ["EVENT_TYPE", "PredictionSink"]

log = logging.getLogger(__name__)

EVENT_TYPE = "io.sidecar.prediction"
SPEC_VERSION = "1.0"
OUTCOMES = ("sent", "retried", "dropped")
# What a CloudEvents header value carries as is (HTTP binding 1.0.2, section 3.1.3.2): printable
# ASCII but for the double quote and the percent sign. The rest is percent-encoded, as UTF-8.
_HEADER_SAFE = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) not in '"%')
# Answers below 500 that mean "not now" rather than "never": worth another try.
_TRANSIENT = frozenset({408, 425, 429})


class _Outcome(enum.Enum):
    SENT = enum.auto()  # a 2xx answer
    AGAIN = enum.auto()  # no answer, a 5xx or a "not now": retry after a backoff
    REFUSED = enum.auto()  # any other answer (400, 404, 413 ...): the same event fails the same


@dataclass(frozen=True, slots=True)
class _Event:
    headers: bytes  # header lines, each ending in CRLF
    body: bytes


class PredictionSink:
    """The sending thread and its queue. `start` starts the thread; `stop` lets it send what is
    queued for up to `sink_timeout` seconds more, counts the rest as dropped, and joins: it
    blocks, so call it through a thread."""

    def __init__(
        self,
        url: str,
        settings: FeedbackSettings,
        *,
        registry: CollectorRegistry,
        dropped: Counter,
    ) -> None:
        self._url = url
        self._settings = settings
        self._endpoint = Endpoint(url, timeout=settings.sink_timeout)
        self._source = settings.sink_source or f"/sidecar/{socket.gethostname()}"
        self._wake = threading.Condition()
        self._pending: deque[PendingPrediction] = deque()
        self._stopping = False
        self._deadline = math.inf  # once stopping: when what is still queued is given up
        self._thread: threading.Thread | None = None
        # A receiver that is down fails every event: counted each time, logged once a minute.
        self._complaints = RateLimitedLog(log)
        self._full = dropped.labels("prediction_sink_full")
        self._failed = dropped.labels("prediction_sink_error")
        events = Counter(
            "sidecar_prediction_sink_events_total",
            "Prediction events for the CloudEvents sink: sent (a 2xx answer), retried (attempts "
            "made again after a failure), dropped (queue full, or given up).",
            ["outcome"],
            registry=registry,
        )
        self._sent, self._retried, self._dropped = (events.labels(name) for name in OUTCOMES)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prediction-sink", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._deadline = time.monotonic() + self._settings.sink_timeout
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, prediction: PendingPrediction) -> None:
        """Queue one exchange's event, or drop and count it when the queue is full. On the event
        loop: never blocks on I/O, the lock is only held by the thread to take an event out."""
        with self._wake:
            if self._stopping or len(self._pending) >= self._settings.sink_queue_size:
                self._full.inc()
                self._dropped.inc()
                return
            self._pending.append(prediction)
            self._wake.notify()

    # --- on the sink's thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (prediction := self._next()) is not None:
                self._deliver(self._event(prediction))
        finally:
            self._endpoint.close()

    def _next(self) -> PendingPrediction | None:
        """The oldest queued prediction; None once stopping with nothing left to send in time."""
        with self._wake:
            self._wake.wait_for(lambda: self._pending or self._stopping)
            if self._stopping and time.monotonic() >= self._deadline:
                self._give_up(len(self._pending))
                self._pending.clear()
            return self._pending.popleft() if self._pending else None

    def _event(self, prediction: PendingPrediction) -> _Event:
        settings = self._settings
        rows = expand(prediction, features=settings.log_features, segment=None)
        model_name, model_version = prediction.model
        when = datetime.fromtimestamp(prediction.ts, UTC)
        attributes = {
            "Content-Type": "application/json",
            "ce-specversion": SPEC_VERSION,
            "ce-type": EVENT_TYPE,
            "ce-source": _header_value(self._source),
            "ce-id": _header_value(prediction.request_id),
            "ce-time": when.isoformat(timespec="milliseconds"),  # RFC 3339
            # KServe's name for the model an event is about, which brokers' triggers filter on.
            "ce-inferenceservicename": _header_value(model_name),
            "ce-modelversion": _header_value(model_version),
        }
        headers = "".join(f"{name}: {text}\r\n" for name, text in attributes.items())
        return _Event(headers.encode("ascii"), orjson.dumps([row_record(row) for row in rows]))

    def _deliver(self, event: _Event) -> None:
        outcome = self._attempt(event)
        for retry in range(1, self._settings.sink_attempts):
            if outcome is not _Outcome.AGAIN or not self._pause(self._backoff(retry)):
                break
            self._retried.inc()
            outcome = self._attempt(event)
        if outcome is _Outcome.SENT:
            self._sent.inc()
        else:
            self._give_up(1)

    def _backoff(self, retry: int) -> float:
        """Seconds before retry number `retry` (from 1): sink_backoff, doubled for each retry
        before it, times a random factor in [0.5, 1] so that the sidecars of a fleet that lost
        the same receiver do not all come back at the same instant."""
        return self._settings.sink_backoff * 2.0 ** (retry - 1) * random.uniform(0.5, 1.0)

    def _pause(self, seconds: float) -> bool:
        """Wait before a retry; False when the sidecar is stopping (no retries then)."""
        with self._wake:
            return not self._wake.wait_for(lambda: self._stopping, timeout=seconds)

    def _attempt(self, event: _Event) -> _Outcome:
        try:
            status = self._endpoint.post(event.headers, event.body)
        except (OSError, httptools.HttpParserError) as exc:  # refused, timed out, cut, garbled
            self._complaints.warning(
                "send", "a prediction event was not delivered", url=self._url, error=repr(exc)
            )
            return _Outcome.AGAIN
        if 200 <= status < 300:
            return _Outcome.SENT
        self._complaints.warning(
            f"status {status}", "the receiver did not take a prediction event", url=self._url
        )
        return _Outcome.AGAIN if status >= 500 or status in _TRANSIENT else _Outcome.REFUSED

    def _give_up(self, events: int) -> None:
        self._failed.inc(events)
        self._dropped.inc(events)


def _header_value(text: str) -> str:
    """A CloudEvents attribute as an HTTP header value: percent-encoded where the binding says.

    >>> _header_value('order 17 "gold" 100%')
    'order%2017%20%22gold%22%20100%25'
    >>> _header_value("a/b:c?d=é")
    'a/b:c?d=%C3%A9'
    """
    return quote(text, safe=_HEADER_SAFE)
