"""The prediction log's writer: one thread that owns the store (a SQLite file or a PostgreSQL
database) and the JSON Lines file.

The event loop only appends to a bounded in-memory queue (`submit`); when the queue holds
`queue_rows` rows, further predictions are dropped and counted. The thread writes whatever has
queued in one transaction (of WRITE_SLICE_ROWS rows at most), runs feedback joins handed to it
as jobs, and calls a refresh hook every `refresh_seconds`. Turning numpy outputs into rows and
features into JSON happens here too, off the loop.

A store that becomes unreachable (StoreUnavailable: a database down, too slow or full) is
closed; until it is opened again, rows are dropped and counted, joins fail fast, and the thread
retries with a backoff from RECONNECT_FIRST doubling to RECONNECT_MAX seconds. The proxy never
waits for any of it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, TypeVar

import numpy as np
import orjson
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter, Gauge

from sidecar.extract.types import FeatureTable, Outputs
from sidecar.feedback.settings import FeedbackSettings
from sidecar.feedback.sqlite import SQLiteStore
from sidecar.feedback.store import (
    MISSING_SEGMENT,
    LoggedRow,
    PredictionStore,
    StoreUnavailable,
    is_postgres_url,
)
from sidecar.logs import RateLimitedLog

__all__ = ["LogBusy", "PendingPrediction", "PredictionLog", "expand", "row_record"]

log = logging.getLogger(__name__)

MAX_PENDING_JOBS = 16
RECONNECT_FIRST = 0.5  # seconds before the first attempt to reopen a store that went away
RECONNECT_MAX = 30.0  # the backoff doubles up to this
WRITE_SLICE_ROWS = 10_000  # most rows per transaction

T = TypeVar("T")
Job = Callable[[PredictionStore], Any]


class LogBusy(RuntimeError):
    """Too many feedback joins are waiting for the writer thread; try again later."""


@dataclass(frozen=True, slots=True)
class PendingPrediction:
    """One exchange's predictions, as the event loop hands them over (arrays not yet unpacked)."""

    ts: float
    request_id: str
    model: tuple[str, str]
    outputs: Outputs
    features: FeatureTable | None
    latency_ms: float
    rows: int


class PredictionLog:
    """The writer thread and its queues. `start` opens the store in the thread; `stop` flushes
    what is queued, closes the files and joins. Both block: call them through a thread."""

    def __init__(
        self,
        settings: FeedbackSettings,
        *,
        registry: CollectorRegistry,
        dropped: Counter,
        up: Gauge,
        refresh: Callable[[PredictionStore, float], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._refresh = refresh
        self._clock = clock
        self._up = up
        self._wake = threading.Condition()
        self._pending: deque[PendingPrediction] = deque()
        self._pending_rows = 0
        self._jobs: deque[tuple[Job, concurrent.futures.Future[Any]]] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.store: PredictionStore | None = None  # None without a store, or while unreachable
        # Why the configured store cannot be used now; read by the event loop to answer 503.
        self.unavailable: str | None = None
        self._backoff = RECONNECT_FIRST
        self._next_attempt = math.inf  # monotonic time to reopen the store; inf while it is open
        self._jsonl: IO[bytes] | None = None
        # A full disk fails every batch: the counters count each one, the log says so once a minute.
        self._complaints = RateLimitedLog(log)
        self._full = dropped.labels("prediction_log_full")
        self._failed = dropped.labels("prediction_log_error")
        self._written = Counter(
            "sidecar_prediction_log_written_total",
            "Predicted rows written to the prediction log (store and/or JSON Lines).",
            registry=registry,
        )
        self._evicted = Counter(
            "sidecar_prediction_log_evicted_total",
            "Rows removed from the prediction log store, oldest first: max_rows or max_age.",
            ["reason"],
            registry=registry,
        )
        self._rows = Gauge(
            "sidecar_prediction_log_rows",
            "Rows held in the prediction log store (on PostgreSQL: the fleet's shared table).",
            # --workers: every process writes the same store (the pod's SQLite file, or the
            # fleet's table), so each sees the same count.
            multiprocess_mode="livemax",
            registry=registry,
        )
        for reason in ("max_rows", "max_age"):
            self._evicted.labels(reason)

    def start(self) -> None:
        """Start the thread; raise (and leave nothing running) if the store or file won't open.
        A store that is only unreachable for now (StoreUnavailable) is retried in the thread."""
        opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="prediction-log", daemon=True
        )
        self._thread.start()
        try:
            opened.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, prediction: PendingPrediction) -> None:
        """Queue rows for writing, or drop and count them when the queue is full. Never blocks on
        I/O: the lock is only held by the thread to swap the queue out."""
        with self._wake:
            if self._stopping or self._pending_rows + prediction.rows > self._settings.queue_rows:
                self._full.inc(prediction.rows)
                return
            self._pending.append(prediction)
            self._pending_rows += prediction.rows
            self._wake.notify()

    def run(self, job: Callable[[PredictionStore], T]) -> concurrent.futures.Future[T]:
        """Run `job(store)` on the writer thread after the rows queued before it are written.
        The future fails with StoreUnavailable if the store is unreachable by then."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._wake:
            if self._stopping or self._thread is None:
                msg = "the prediction log is not running"
                raise LogBusy(msg)
            if len(self._jobs) >= MAX_PENDING_JOBS:
                msg = f"{MAX_PENDING_JOBS} feedback calls are already waiting"
                raise LogBusy(msg)
            self._jobs.append((job, future))
            self._wake.notify()
        return future

    def _run(self, opened: concurrent.futures.Future[None]) -> None:
        try:
            self._open()
        except BaseException as exc:
            opened.set_exception(exc)
            return
        opened.set_result(None)
        try:
            self._loop()
        finally:
            self._close()

    def _open(self) -> None:
        settings = self._settings
        if settings.store is not None:
            try:
                self._attach(open_store(settings))
            except StoreUnavailable as exc:  # e.g. the database starts after the sidecar
                self._detach(exc)
        else:
            self._up.set(1)
        if settings.jsonl == "-":
            self._jsonl = sys.stdout.buffer
        elif settings.jsonl is not None:
            try:
                self._jsonl = open(settings.jsonl, "ab")  # noqa: SIM115 (closed in _close)
            except BaseException:
                self._close()
                raise

    def _close(self) -> None:
        self._up.set(0)
        if self.store is not None:
            self.store.close()
        if self._jsonl is not None and self._jsonl is not sys.stdout.buffer:
            self._jsonl.close()

    def _loop(self) -> None:
        next_refresh = time.monotonic()
        while True:
            with self._wake:
                if not (self._pending or self._jobs or self._stopping):
                    wake_at = min(next_refresh, self._next_attempt)
                    self._wake.wait(max(0.0, wake_at - time.monotonic()))
                batch, self._pending, self._pending_rows = self._pending, deque(), 0
                jobs, self._jobs = self._jobs, deque()
                done = self._stopping and not batch and not jobs
            if time.monotonic() >= self._next_attempt:
                self._reopen()
            if batch:
                self._write(batch)
            for job, future in jobs:
                # Rows queued before the job are written first, so a label can find them.
                self._run_job(job, future)
            if done:
                return
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + self._settings.refresh_seconds
                self._maintain()

    def _write(self, batch: deque[PendingPrediction]) -> None:
        settings = self._settings
        rows = [
            row
            for prediction in batch
            for row in expand(prediction, features=settings.log_features, segment=settings.segment)
        ]
        if self._jsonl is not None:
            try:
                self._jsonl.write(b"".join(map(_jsonl_line, rows)))
                self._jsonl.flush()
            except OSError as exc:
                self._complaints.warning("jsonl", "writing the JSON Lines failed", error=str(exc))
        if settings.store is None:
            self._written.inc(len(rows))
        else:
            self._store(rows)

    def _store(self, rows: list[LoggedRow]) -> None:
        """Append the rows in slices of WRITE_SLICE_ROWS, then enforce the bounds. A backlog of
        up to queue_rows rows thus goes in several transactions, each well within the statement
        timeout of a shared database."""
        for start in range(0, len(rows), WRITE_SLICE_ROWS):
            if self.store is None:  # unreachable: said once when it went away
                self._failed.inc(len(rows) - start)
                return
            part = rows[start : start + WRITE_SLICE_ROWS]
            try:
                self.store.append(part)
            except Exception as exc:  # a full disk or a lost database must not stop the thread
                self._failed.inc(len(rows) - start)
                self._complaints.warning(
                    "store", "writing the prediction log failed", error=repr(exc)
                )
                if isinstance(exc, StoreUnavailable):
                    self._detach(exc)
                return
            self._written.inc(len(part))
        self._evict()

    def _run_job(self, job: Job, future: concurrent.futures.Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        if self.store is None:
            missing = "the prediction log has no store"
            down = self.unavailable
            future.set_exception(LogBusy(missing) if down is None else StoreUnavailable(down))
            return
        try:
            future.set_result(job(self.store))
        except StoreUnavailable as exc:
            self._detach(exc)
            future.set_exception(exc)
        except BaseException as exc:
            future.set_exception(exc)

    def _maintain(self) -> None:
        """Age out old rows even without traffic, then let the owner recompute its gauges."""
        if self._evict() and self.store is not None and self._refresh is not None:
            try:
                self._refresh(self.store, self._clock())
            except StoreUnavailable as exc:
                self._detach(exc)
            except Exception as exc:
                self._complaints.warning("refresh", "the windowed gauges failed", error=repr(exc))

    def _evict(self) -> bool:
        """Enforce the store's bounds and count what went; False if there is no store to use."""
        if self.store is None:
            return False
        try:
            evicted = self.store.evict(self._clock())
        except StoreUnavailable as exc:
            self._detach(exc)
            return False
        except Exception as exc:
            self._complaints.warning("evict", "prediction log upkeep failed", error=repr(exc))
            return True
        for reason, count in evicted.items():
            if count:
                self._evicted.labels(reason).inc(count)
        self._rows.set(self.store.rows)
        return True

    def _attach(self, store: PredictionStore) -> None:
        self.store, self.unavailable = store, None
        self._backoff, self._next_attempt = RECONNECT_FIRST, math.inf
        self._rows.set(store.rows)
        self._up.set(1)

    def _detach(self, exc: StoreUnavailable) -> None:
        """Close a store that went away (or never came); the loop reopens it after the backoff."""
        log.warning("the prediction log's store is unreachable", extra={"error": str(exc)})
        if self.store is not None:
            self.store.close()
        self.store, self.unavailable = None, str(exc)
        self._next_attempt = time.monotonic() + self._backoff
        self._up.set(0)

    def _reopen(self) -> None:
        try:
            store = open_store(self._settings)
        except Exception as exc:  # still down, or (a newer schema) not ours to use: keep trying
            self._backoff = min(self._backoff * 2, RECONNECT_MAX)
            self._next_attempt = time.monotonic() + self._backoff
            self.unavailable = str(exc)
            self._complaints.warning(
                "reopen", "the prediction log's store is still unreachable", error=str(exc)
            )
            return
        log.info("the prediction log's store is reachable again")
        self._attach(store)


def open_store(settings: FeedbackSettings) -> PredictionStore:
    """The configured store: a PostgreSQL database for a postgresql:// URL, else a SQLite file."""
    store, max_rows, max_age = settings.store, settings.max_rows, settings.max_age_seconds
    assert store is not None
    if is_postgres_url(store):
        # Here: psycopg is loaded only by the sidecars that use it (tests/test_footprint.py).
        from sidecar.feedback.postgres import PostgresStore

        return PostgresStore(store, max_rows=max_rows, max_age_seconds=max_age)
    return SQLiteStore(store, max_rows=max_rows, max_age_seconds=max_age)


def expand(
    prediction: PendingPrediction, *, features: bool, segment: str | None
) -> list[LoggedRow]:
    """One LoggedRow per row of a batch: class, confidence, value, segment and features."""
    n = prediction.rows
    outputs = prediction.outputs
    classes = _cells(outputs.classes, n)
    confidence = _floats(outputs.confidence, n)
    values = _floats(outputs.value, n)
    table = prediction.features
    cells = _feature_json(table, n) if features and table is not None else [None] * n
    segments: list[str | None] = [None] * n
    if segment is not None:
        segments[:] = _segments(table, segment, n)
    model_name, model_version = prediction.model
    return [
        LoggedRow(
            prediction.request_id,
            row,
            prediction.ts,
            model_name,
            model_version,
            None if classes[row] is None else str(classes[row]),
            confidence[row],
            values[row],
            segments[row],
            cells[row],
            prediction.latency_ms,
        )
        for row in range(n)
    ]


def _cells(array: NDArray[Any] | None, n: int) -> list[Any]:
    found = [] if array is None else array.tolist()[:n]
    return found + [None] * (n - len(found))


def _floats(array: NDArray[np.float64] | None, n: int) -> list[float | None]:
    return [None if v is None or v != v else v for v in _cells(array, n)]  # v != v: NaN


def _feature_column(table: FeatureTable, index: int) -> list[Any]:
    """One column as JSON-ready cells: numbers, strings, or None where missing."""
    cells = table.numeric[:, index].astype(object)
    cells[table.missing[:, index]] = None
    texts = table.strings.get(table.columns[index])
    if texts is not None:
        wrong = table.non_numeric[:, index]
        cells[wrong] = texts[wrong]
    return list(cells.tolist())


def _feature_json(table: FeatureTable, n: int) -> list[str | None]:
    names = table.columns
    columns = [_feature_column(table, index) for index in range(len(names))]
    rows = zip(*columns, strict=True) if names else iter(())
    # orjson writes NaN and infinities as null, which is what JSON can say about them.
    found = [orjson.dumps(dict(zip(names, row, strict=True))).decode() for row in rows]
    return [*found[:n], *([None] * (n - len(found)))]


def _segments(table: FeatureTable | None, segment: str, n: int) -> list[str]:
    if table is None or segment not in table.columns:
        return [MISSING_SEGMENT] * n
    cells = _feature_column(table, table.columns.index(segment))
    return [_segment_value(cell) for cell in cells[:n]] + [MISSING_SEGMENT] * (n - len(cells))


def _segment_value(cell: Any) -> str:
    if cell is None:
        return MISSING_SEGMENT
    if isinstance(cell, float) and cell.is_integer():
        return str(int(cell))
    return str(cell)


def row_record(row: LoggedRow) -> dict[str, Any]:
    """A logged row as the JSON object that leaves the sidecar: a JSON Lines line, and an item of
    a prediction event (sidecar.feedback.cloudevents)."""
    record: dict[str, Any] = {
        "timestamp": datetime.fromtimestamp(row.ts, UTC).isoformat(timespec="milliseconds"),
        "request_id": row.request_id,
        "row": row.row,
        "model_name": row.model_name,
        "model_version": row.model_version,
        "prediction": row.predicted if row.predicted is not None else row.value,
        "probability": row.confidence,
        "latency_ms": row.latency_ms,
    }
    if row.features is not None:
        record["features"] = orjson.Fragment(row.features)
    return record


def _jsonl_line(row: LoggedRow) -> bytes:
    return orjson.dumps(row_record(row)) + b"\n"
