"""The `feedback:` section of the config: the prediction log, its sinks, and the windows of the
metrics from labels. Plain settings, so that the config can import them without the recorders."""

from __future__ import annotations

import msgspec

__all__ = ["FeedbackSettings"]


class FeedbackSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Prediction log, `POST /feedback` and the metrics from labels (docs/ground-truth.md).

    `store` is off by default, so a sidecar without a writable disk runs as before; a store that
    cannot be opened is logged and /feedback answers 503, the proxy keeps serving.
    """

    store: str | None = None  # SQLite file (WAL); None keeps no predictions
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
