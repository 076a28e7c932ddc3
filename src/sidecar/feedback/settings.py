"""The `feedback:` section of the config: the prediction log, its sinks, and the windows of the
metrics from labels. Plain settings, so that the config can import them without the recorders."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import msgspec

__all__ = ["FeedbackSettings"]

_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class FeedbackSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Prediction log, `POST /feedback` and the metrics from labels (docs/ground-truth.md).

    `store` is off by default, so a sidecar without a writable disk runs as before; a store that
    cannot be opened is logged and /feedback answers 503, the proxy keeps serving.
    """

    # A SQLite file (WAL), or a postgresql:// (postgres://) URL of a database that every replica
    # shares (sidecar.feedback.postgres); None keeps no predictions.
    store: str | None = None
    max_rows: int = 1_000_000
    max_age_seconds: float = 7 * 24 * 3600.0
    sample_rate: float = 1.0  # share of requests logged, chosen by a hash of the request id
    log_features: bool = True  # False keeps features out of the store and the JSON Lines
    jsonl: str | None = None  # JSON Lines file, or "-" for stdout
    token: str | None = None  # bearer token for /feedback; also SIDECAR_FEEDBACK_TOKEN
    window_rows: tuple[int, ...] = (1000,)
    window_seconds: tuple[float, ...] = (3600.0,)
    segment: str | None = None  # a low-cardinality feature to break the label metrics down by
    class_names: tuple[str, ...] | None = None  # index -> class for labels; default: mapping's
    queue_rows: int = 100_000  # rows waiting for the writer; beyond it they are dropped
    refresh_seconds: float = 10.0  # how often the windowed gauges are recomputed
    # Prediction events to a CloudEvents HTTP endpoint (sidecar.feedback.cloudevents).
    sink_url: str | None = None  # http:// or https://; None sends no events
    sink_source: str | None = None  # the events' `source`; None: /sidecar/<host name>
    sink_queue_size: int = 10_000  # events waiting to be sent; beyond it they are dropped
    sink_timeout: float = 5.0  # seconds for each HTTP request (connect, send, answer)
    sink_attempts: int = 5  # tries per event before it is given up
    sink_backoff: float = 0.2  # seconds before the first retry, doubling after each one

    def __post_init__(self) -> None:
        positive = {"max_rows": self.max_rows, "max_age_seconds": self.max_age_seconds}
        positive |= {"queue_rows": self.queue_rows, "refresh_seconds": self.refresh_seconds}
        positive |= {"window_rows": min(self.window_rows, default=1)}
        positive |= {"window_seconds": min(self.window_seconds, default=1)}
        for key, value in positive.items():
            if value <= 0:
                msg = f"{key} must be positive, got {value}"
                raise ValueError(msg)
        if not 0.0 <= self.sample_rate <= 1.0:
            msg = f"sample_rate must be within [0, 1], got {self.sample_rate}"
            raise ValueError(msg)
        _check_sink(self)
        _check_store(self.store)


def _check_store(store: str | None) -> None:
    """A path, or a PostgreSQL URL: another scheme is a mistake, not a file to create."""
    scheme = _URL_SCHEME.match(store or "")
    if scheme is not None and scheme[1] not in ("postgres", "postgresql"):  # as libpq spells them
        msg = f"store must be a file path or a postgresql:// URL, not a {scheme[1]}:// URL"
        raise ValueError(msg)


def _check_sink(settings: FeedbackSettings) -> None:
    if settings.sink_url is not None and not _is_http_url(settings.sink_url):
        msg = (
            f"sink_url {settings.sink_url!r} must be an http:// or https:// URL with a host, "
            "e.g. http://broker-ingress.knative-eventing.svc.cluster.local/default/default"
        )
        raise ValueError(msg)
    if settings.sink_source == "":
        msg = "sink_source must not be empty: it is every event's `source` (a URI reference)"
        raise ValueError(msg)
    positive: dict[str, float] = {"sink_queue_size": settings.sink_queue_size}
    positive |= {"sink_timeout": settings.sink_timeout, "sink_attempts": settings.sink_attempts}
    for key, value in positive.items():
        if value <= 0:
            msg = f"{key} must be positive, got {value}"
            raise ValueError(msg)
    if settings.sink_backoff < 0:
        msg = f"sink_backoff must be 0 or more seconds, got {settings.sink_backoff}"
        raise ValueError(msg)


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (read for its check: a port that is no number, or out of range)
    except ValueError:
        return False
    return url.isascii() and parts.scheme in ("http", "https") and bool(parts.hostname)
