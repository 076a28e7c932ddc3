"""The prediction log's writer: one thread that owns the store (a SQLite file or a PostgreSQL
database) and the JSON Lines file.

The event loop only appends to a bounded in-memory queue (`submit`), one PredictionBatch per
drain of its exchanges rather than one entry per request; when the queue holds `queue_rows` rows,
further predictions are dropped and counted. The thread writes whatever has queued in one
transaction (of WRITE_SLICE_ROWS rows at most), at most once every WRITE_DELAY seconds, runs
feedback joins handed to it as jobs, and calls a refresh hook every `refresh_seconds`. Turning
numpy outputs into rows and features into JSON happens here too, off the loop, a column at a time
for a whole batch (`expand_batch`): per row, only what cannot be shared is done.

A store that becomes unreachable (StoreUnavailable: a database down, too slow or full) is
closed; until it is opened again, rows are dropped and counted, joins fail fast, and the thread
retries with a backoff from RECONNECT_FIRST doubling to RECONNECT_MAX seconds. The proxy never
waits for any of it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain, repeat
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

__all__ = [
    "LogBusy",
    "PendingPrediction",
    "PredictionBatch",
    "PredictionLog",
    "expand",
    "expand_batch",
    "row_record",
]

log = logging.getLogger(__name__)

MAX_PENDING_JOBS = 16
RECONNECT_FIRST = 0.5  # seconds before the first attempt to reopen a store that went away
RECONNECT_MAX = 30.0  # the backoff doubles up to this
WRITE_SLICE_ROWS = 10_000  # most rows per transaction
# Seconds the writer lets rows gather after a write (unless half the queue is full, a join waits,
# or the log stops): a transaction, its eviction check and, on PostgreSQL, their round trips are
# paid some 20 times a second under load rather than at every drain of the event loop. Rows
# arriving after a quiet spell are written at once.
WRITE_DELAY = 0.05

T = TypeVar("T")
Job = Callable[[PredictionStore], Any]


class LogBusy(RuntimeError):
    """Too many feedback joins are waiting for the writer thread; try again later."""


@dataclass(frozen=True, slots=True)
class PendingPrediction:
    """One exchange's predictions (arrays not yet unpacked), as the sink takes them: one event
    each (sidecar.feedback.cloudevents)."""

    ts: float
    request_id: str
    model: tuple[str, str]
    outputs: Outputs
    features: FeatureTable | None
    latency_ms: float
    rows: int


@dataclass(frozen=True, slots=True)
class PredictionBatch:
    """The logged exchanges of one extraction, as the event loop hands them over: the arrays as
    extracted, not yet unpacked, and each exchange's request id, latency and rows.

    The extraction is one exchange's, or several read as one (sidecar.extract.batch). Exchanges
    that are not logged (not sampled, no rows, no room in the queue) are simply not listed. Each
    array of a merged extraction has a value for every row; one exchange's arrays may fall short
    of its rows (say, fewer outputs than feature rows), and the rows past their end get None.
    """

    ts: float
    model: tuple[str, str]
    outputs: Outputs
    features: FeatureTable | None
    request_ids: list[str]
    latencies_ms: list[float]
    starts: list[int]  # each exchange's first row in the arrays, in increasing order
    counts: list[int]  # and how many rows it has (one or more)

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def only(self, exchanges: list[int]) -> PredictionBatch:
        """The batch with only these exchanges (positions in the lists, in order)."""
        return PredictionBatch(
            self.ts,
            self.model,
            self.outputs,
            self.features,
            [self.request_ids[i] for i in exchanges],
            [self.latencies_ms[i] for i in exchanges],
            [self.starts[i] for i in exchanges],
            [self.counts[i] for i in exchanges],
        )

    def exchanges(self) -> Iterator[PendingPrediction]:
        """Each exchange on its own, its arrays views of the batch's."""
        members = zip(self.request_ids, self.latencies_ms, self.starts, self.counts, strict=True)
        for request_id, latency_ms, start, count in members:
            stop = start + count
            features = None if self.features is None else self.features.rows(start, stop)
            outputs = self.outputs.rows(start, stop)
            yield PendingPrediction(
                self.ts, request_id, self.model, outputs, features, latency_ms, count
            )


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
        self._pending: deque[PredictionBatch] = deque()
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

    def submit(self, batch: PredictionBatch) -> None:
        """Queue a batch's rows for writing. When the queue is full, each exchange that does not
        fit is dropped and its rows counted, as if it had come alone. Never blocks on I/O: the
        lock is only held by the thread to swap the queue out."""
        queue_rows = self._settings.queue_rows
        with self._wake:
            rows = batch.rows
            if self._stopping or self._pending_rows + rows > queue_rows:
                batch = self._fitting(batch)
                rows = batch.rows
                if not rows:
                    return
            # An idle thread sleeps until its next chore: wake it so that it counts WRITE_DELAY
            # from now. One that is gathering rows comes back for them on its own.
            wake = not self._pending or 2 * (self._pending_rows + rows) >= queue_rows
            self._pending.append(batch)
            self._pending_rows += rows
            if wake:
                self._wake.notify()

    def _fitting(self, batch: PredictionBatch) -> PredictionBatch:
        """The exchanges that still fit in the queue, in order; the others dropped and counted."""
        room = 0 if self._stopping else self._settings.queue_rows - self._pending_rows
        kept: list[int] = []
        dropped = 0
        for position, count in enumerate(batch.counts):
            if count <= room:
                kept.append(position)
                room -= count
            else:
                dropped += count
        self._full.inc(dropped)
        return batch.only(kept)

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
        written_at = -math.inf
        while True:
            with self._wake:
                self._gather(min(next_refresh, self._next_attempt), written_at + WRITE_DELAY)
                batch, self._pending, self._pending_rows = self._pending, deque(), 0
                jobs, self._jobs = self._jobs, deque()
                done = self._stopping and not batch and not jobs
            if time.monotonic() >= self._next_attempt:
                self._reopen()
            if batch:
                written_at = time.monotonic()
                self._write(batch)
            for job, future in jobs:
                # Rows queued before the job are written first, so a label can find them.
                self._run_job(job, future)
            if done:
                return
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + self._settings.refresh_seconds
                self._maintain()

    def _gather(self, chore_at: float, write_at: float) -> None:
        """With the lock held: wait until there is something to do. Queued rows are due at
        `write_at`, or at once when half the queue is full; joins and stopping are due at once;
        the refresh and a reconnection at `chore_at`."""
        half = self._settings.queue_rows / 2
        while not (self._jobs or self._stopping or self._pending_rows >= half):
            wake_at = min(chore_at, write_at) if self._pending else chore_at
            now = time.monotonic()
            if now >= wake_at:
                return
            self._wake.wait(wake_at - now)

    def _write(self, batch: deque[PredictionBatch]) -> None:
        settings = self._settings
        rows: list[LoggedRow] = []
        for pending in batch:
            rows += expand_batch(pending, features=settings.log_features, segment=settings.segment)
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
    """One LoggedRow per row of one exchange: class, confidence, value, segment and features."""
    batch = PredictionBatch(
        prediction.ts,
        prediction.model,
        prediction.outputs,
        prediction.features,
        [prediction.request_id],
        [prediction.latency_ms],
        [0],
        [prediction.rows],
    )
    return expand_batch(batch, features=features, segment=segment)


def expand_batch(batch: PredictionBatch, *, features: bool, segment: str | None) -> list[LoggedRow]:
    """One LoggedRow per row of a batch's exchanges, in order. Built a column at a time: each
    array is cut and converted to Python values once for the whole batch."""
    n = batch.rows
    if not n:
        return []
    at = _positions(batch)
    outputs = batch.outputs
    classes = [None if cell is None else str(cell) for cell in _cells(outputs.classes, at, n)]
    confidence = _floats(outputs.confidence, at, n)
    values = _floats(outputs.value, at, n)
    table = None if batch.features is None else _table_rows(batch.features, at)
    cells: Iterable[str | None] = repeat(None)
    if features and table is not None:
        cells = _feature_json(table, n)
    segments: Iterable[str | None] = repeat(None)
    if segment is not None:
        segments = _segments(table, segment, n)
    request_ids, latencies = batch.request_ids, batch.latencies_ms
    if len(request_ids) == n:  # one row per exchange: the lists are the columns
        row_numbers: Iterable[int] = repeat(0)
    else:
        counts = batch.counts
        request_ids = list(chain.from_iterable(map(repeat, request_ids, counts)))
        latencies = list(chain.from_iterable(map(repeat, latencies, counts)))
        row_numbers = chain.from_iterable(map(range, counts))
    model_name, model_version = batch.model
    columns = zip(
        request_ids,
        row_numbers,
        repeat(batch.ts),
        repeat(model_name),
        repeat(model_version),
        classes,
        confidence,
        values,
        segments,
        cells,
        latencies,
    )
    return list(map(LoggedRow._make, columns))


def _positions(batch: PredictionBatch) -> slice | NDArray[np.intp]:
    """Where the batch's rows are in its arrays: the first n, in the usual case where every
    exchange of the extraction is logged."""
    n = batch.rows
    if batch.starts[0] == 0 and batch.starts[-1] + batch.counts[-1] == n:
        return slice(0, n)
    counts = np.array(batch.counts)
    firsts = np.cumsum(counts) - counts  # each exchange's first row in the batch
    return np.repeat(np.array(batch.starts) - firsts, counts) + np.arange(n)


def _cells(array: NDArray[Any] | None, at: slice | NDArray[np.intp], n: int) -> list[Any]:
    found = [] if array is None else array[at].tolist()
    return found + [None] * (n - len(found))


def _floats(
    array: NDArray[np.float64] | None, at: slice | NDArray[np.intp], n: int
) -> list[float | None]:
    """The batch's rows of a float array, None where NaN (no number to log) or beyond its end."""
    if array is None:
        return [None] * n
    values: list[float] = array[at].tolist()
    padding: list[None] = [None] * (n - len(values))
    total = sum(values)  # one C loop: NaN if any value is NaN (or infinities of both signs are)
    if total != total:
        return [None if value != value else value for value in values] + padding
    return values + padding


def _table_rows(table: FeatureTable, at: slice | NDArray[np.intp]) -> FeatureTable:
    if isinstance(at, slice):
        # Often the whole table, as with one exchange: then no new views of its arrays.
        return table if at.stop >= table.n_rows else table.rows(0, at.stop)
    return FeatureTable(
        table.columns,
        table.numeric[at],
        table.missing[at],
        table.non_numeric[at],
        {name: texts[at] for name, texts in table.strings.items()},
    )


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
    """Each row's features as the JSON object orjson.dumps(dict(zip(columns, row))) writes, made
    a column at a time: one orjson call writes every number of the table, as it writes Python
    floats (null where NaN or infinite, as JSON must), and the objects are joined from those
    pieces."""
    names = table.columns
    if not names or not table.n_rows:
        return [None] * n
    width = len(names)
    numeric = np.ascontiguousarray(table.numeric, dtype=np.float64)  # orjson takes no other
    text = orjson.dumps(numeric, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    numbers = text[2:-2].replace("],[", ",").split(",")  # [[a,b],[c,d]]: a, b, c, d
    columns = [numbers[index::width] for index in range(width)]
    # Columns with a missing or non-numeric cell (never in a merged extraction) go cell by cell.
    if np.count_nonzero(table.missing) or np.count_nonzero(table.non_numeric):
        flagged = table.missing.any(axis=0) | table.non_numeric.any(axis=0)
        for index in np.flatnonzero(flagged).tolist():
            cells = _feature_column(table, index)
            columns[index] = [orjson.dumps(cell).decode() for cell in cells]
    pieces: list[Iterable[str]] = []
    for key, index in _object_keys(names):
        pieces += (repeat(key), columns[index])
    found: list[str | None] = list(map("".join, zip(*pieces, repeat("}"))))
    return found + [None] * (n - len(found))


@functools.lru_cache(maxsize=256)
def _object_keys(names: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """What goes before each value of a row's JSON object (`{"name":` or `,"name":`) and which
    column that value is in. As in a dict, a repeated name keeps its first place and its last
    value. Cached: a model's requests name the same columns again and again."""
    last = {name: index for index, name in enumerate(names)}
    return tuple(
        (("," if place else "{") + orjson.dumps(name).decode() + ":", index)
        for place, (name, index) in enumerate(last.items())
    )


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
