"""Ground truth: log predictions, join labels posted to /feedback, and count what they say.

On the event loop (`record`, once per exchange): the label-free estimate (CBPE: the predicted
class's confidence summed as `ml_expected_correct_total`) and a hand-off of the rows to the
prediction log. On the log's thread (`_join`, once per /feedback call): each label is matched to
its logged row and counted in mergeable counters:

- `ml_labelled_total{class, predicted, correct, segment}`: the confusion matrix. `correct` repeats
  `class == predicted` because PromQL cannot compare two labels.
- `ml_labelled_replaced_total{...}`: the (class, predicted) cell a later label for the same row
  replaced. Counters cannot go down; labelled minus replaced is the current matrix.
- `ml_regression_labelled_total{segment, stat}` and `ml_regression_replaced_total`: rows,
  absolute_error and squared_error, for MAE and RMSE.

The HTTP side (status codes, the bearer token) lives in admin.py; here a bad body is a
FeedbackError carrying the status it deserves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated

import msgspec
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from sidecar.config import Config
from sidecar.extract.types import Extraction, Outputs
from sidecar.feedback.cloudevents import PredictionSink
from sidecar.feedback.log import LogBusy, PredictionBatch, PredictionLog
from sidecar.feedback.stats import WindowGauges
from sidecar.feedback.store import (
    MISSING_SEGMENT,
    NewLabel,
    PredictionStore,
    StoredRow,
    StoreUnavailable,
)
from sidecar.recorders.labels import LabelCap, OverflowCounter
from sidecar.recorders.red import MODEL_LABELS

__all__ = ["MAX_ITEMS", "FeedbackError", "FeedbackItem", "FeedbackRecorder", "parse_feedback"]

log = logging.getLogger(__name__)

MAX_ITEMS = 10_000
RESULTS = ("matched", "unmatched", "duplicate", "invalid")
REGRESSION_STATS = ("rows", "absolute_error", "squared_error")
_INTEGER = re.compile(r"[+-]?\d+")

Label = Annotated[str, msgspec.Meta(max_length=1024)] | int | float


class FeedbackItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One label: for row `row` (0 unless the request was a batch) of request `request_id`."""

    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    label: Label
    row: Annotated[int, msgspec.Meta(ge=0)] = 0


class FeedbackError(ValueError):
    """A /feedback call that cannot be applied; `status` is the HTTP answer it deserves."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_feedback(body: bytes) -> list[FeedbackItem]:
    """One item or a list of up to MAX_ITEMS items, or FeedbackError(400 or 413) saying why not.

    >>> [item.label for item in parse_feedback(b'[{"request_id": "a", "label": "cat"}]')]
    ['cat']
    >>> parse_feedback(b'{"request_id": "b", "label": 2, "row": 3}')
    [FeedbackItem(request_id='b', label=2, row=3)]
    """
    try:
        decoded = msgspec.json.decode(body, type=FeedbackItem | list[FeedbackItem])
    except msgspec.ValidationError as exc:
        raise FeedbackError(400, f"not a feedback item or list of items: {exc}") from None
    except msgspec.DecodeError as exc:
        raise FeedbackError(400, f"body is not JSON: {exc}") from None
    items = [decoded] if isinstance(decoded, FeedbackItem) else decoded
    if len(items) > MAX_ITEMS:
        raise FeedbackError(413, f"{len(items)} items; at most {MAX_ITEMS} per call")
    return items  # JSON has no NaN or infinity, and msgspec refuses numbers out of range


def class_label(label: str | int | float, names: Sequence[str] | None) -> str:
    """The class a label names, spelled as extraction spells predicted classes: a class name as
    is, an index (int or digits) through `names` when it has one, else the index as text.

    >>> names = ("setosa", "versicolor")
    >>> class_label(1, names), class_label("1", names), class_label("setosa", names)
    ('versicolor', 'versicolor', 'setosa')
    >>> class_label(7, names), class_label(2.0, None), class_label("spam", None)
    ('7', '2', 'spam')
    """
    if isinstance(label, str):
        if (names and label in names) or not _INTEGER.fullmatch(label.strip()):
            return label
        label = int(label)
    if isinstance(label, float):
        if not label.is_integer():
            return repr(label)
        label = int(label)
    if names and 0 <= label < len(names):
        return names[label]
    return str(label)


def value_label(label: str | int | float) -> float | None:
    """A regression label as a number, or None when it is not one."""
    try:
        number = float(label)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class FeedbackRecorder:
    """Prediction log, label joins and the metrics from labels and confidences."""

    def __init__(
        self,
        registry: CollectorRegistry,
        config: Config,
        *,
        dropped: Counter,
        overflow: OverflowCounter,
        joins: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`joins`: this process takes labels (POST /feedback) and computes the windowed gauges
        from the store. A worker of --workers does neither: it only writes its rows into the
        store the supervisor joins against (sidecar.workers.supervisor)."""
        settings = config.feedback
        self.token = settings.token
        self._settings = settings
        self._clock = clock
        self._class_names = settings.class_names or _mapping_class_names(config)
        self._sample_below = int(settings.sample_rate * 2**32)
        self._cap = functools.partial(LabelCap, limit=config.label_cap, overflow=overflow)
        self._class_caps: dict[tuple[str, str], LabelCap] = {}
        self._segment_caps: dict[tuple[str, str], LabelCap] = {}
        self._cbpe: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        self._default_model = (config.model_name, config.model_version)
        self._register(registry)
        self._gauges = (
            WindowGauges(
                registry,
                settings,
                fold_class=self._fold_class,
                fold_segment=self._fold_segment if settings.segment else None,
            )
            if joins
            else None
        )
        self._log: PredictionLog | None = None
        self._broken = False
        if settings.store is not None or settings.jsonl is not None:
            self._log = PredictionLog(
                settings,
                registry=registry,
                dropped=dropped,
                up=self._up,
                refresh=self._refresh if joins else None,
                clock=clock,
            )
        self._sink: PredictionSink | None = None  # works with or without the log
        if settings.sink_url is not None:
            self._sink = PredictionSink(
                settings.sink_url, settings, registry=registry, dropped=dropped
            )

    def _register(self, registry: CollectorRegistry) -> None:
        def counter(name: str, text: str, *labels: str) -> Counter:
            return Counter(name, text, [*MODEL_LABELS, *labels], registry=registry)

        self._expected = counter(
            "ml_expected_correct_total",
            "Sum of the predicted class's confidence over rows; divided by "
            "ml_expected_correct_rows_total it estimates accuracy without labels (CBPE), "
            "if confidences are calibrated.",
        )
        self._expected_rows = counter(
            "ml_expected_correct_rows_total", "Rows with a confidence, the CBPE denominator."
        )
        self._feedback = counter(
            "ml_feedback_total",
            "Labels posted to /feedback: matched (first label of a logged row), duplicate "
            "(replaces an earlier label), unmatched (no such row logged), invalid (the label "
            "does not fit the row, e.g. text for a regression).",
            "result",
        )
        names = ("class", "predicted", "correct", "segment")
        self._labelled = counter(
            "ml_labelled_total", "Labelled rows by label (class) and predicted class.", *names
        )
        self._replaced = counter(
            "ml_labelled_replaced_total",
            "Labelled rows whose label a later one replaced, by the replaced (class, predicted).",
            *names,
        )
        self._regression = counter(
            "ml_regression_labelled_total",
            "Labelled regression rows (stat=rows) and their absolute_error and squared_error.",
            "segment",
            "stat",
        )
        self._regression_replaced = counter(
            "ml_regression_replaced_total",
            "The rows and errors of regression labels that a later label replaced.",
            "segment",
            "stat",
        )
        for result in RESULTS:  # unmatched labels count under the default model: exist from start
            self._feedback.labels(*self._default_model, result)
        self._up = Gauge(
            "sidecar_prediction_log_up",
            "1 while the prediction log (store or JSON Lines) is open and its store reachable; "
            "0 when it is off, failed, or its database is unreachable.",
            multiprocess_mode="livemin",  # --workers: 1 while every worker's log is open
            registry=registry,
        )

    async def open(self) -> None:
        """Open the store and start its thread. A store that will not open is logged and the
        sidecar runs without it: the proxy must not depend on a disk. A database that is only
        unreachable is retried by the thread (sidecar_prediction_log_up says which)."""
        if self._sink is not None:
            self._sink.start()
        if self._log is None:
            return
        try:
            await asyncio.to_thread(self._log.start)
        except Exception:
            log.exception("the prediction log could not be opened; running without it")
            self._log, self._broken = None, True

    async def close(self) -> None:
        """Write what is queued and close the store; send what waits for the sink."""
        if self._sink is not None:
            await asyncio.to_thread(self._sink.stop)
        if self._log is not None:
            await asyncio.to_thread(self._log.stop)

    def record(
        self, model: tuple[str, str], request_id: str, extraction: Extraction, seconds: float
    ) -> None:
        """Count the expected-correct sum and queue the rows for the log. On the event loop."""
        self.record_merged(model, extraction, [(request_id, seconds, _row_count(extraction))])

    def record_merged(
        self,
        model: tuple[str, str],
        extraction: Extraction,
        members: Iterable[tuple[str, float, int]],
    ) -> None:
        """`record` for several exchanges read as one (sidecar.extract.batch): `members` gives
        each one's request id, seconds and rows, in the order of the extraction's rows (read
        only when predictions are logged). The sampled ones go to the log as one batch, and to
        the sink one by one."""
        self._count_expected(model, extraction.outputs)
        if self._log is None and self._sink is None:
            return
        sample_below = self._sample_below
        every = sample_below > 0xFFFFFFFF  # sample_rate 1: no hash can be refused
        request_ids: list[str] = []
        latencies: list[float] = []
        starts: list[int] = []
        counts: list[int] = []
        start = 0
        for request_id, seconds, rows in members:
            # Sampled by a hash of the request id, so every replica logs the same requests.
            if rows and (every or zlib.crc32(request_id.encode()) < sample_below):
                request_ids.append(request_id)
                latencies.append(seconds * 1000.0)
                starts.append(start)
                counts.append(rows)
            start += rows
        if not request_ids:
            return
        batch = PredictionBatch(
            self._clock(),
            model,
            extraction.outputs,
            extraction.features,
            request_ids,
            latencies,
            starts,
            counts,
        )
        if self._log is not None:
            self._log.submit(batch)
        if self._sink is not None:
            for prediction in batch.exchanges():
                self._sink.submit(prediction)

    def _count_expected(self, model: tuple[str, str], outputs: Outputs) -> None:
        if outputs.confidence is not None and outputs.confidence.size:
            finite = outputs.confidence[np.isfinite(outputs.confidence)]
            if finite.size:
                expected, rows = self._cbpe_children(model)
                expected.inc(float(finite.sum()))
                rows.inc(int(finite.size))

    async def apply(self, items: Sequence[FeedbackItem]) -> dict[str, int]:
        """Join labels to logged rows on the log's thread; counts by result."""
        if self._log is None or self._settings.store is None:
            reason = (
                "the prediction log could not be opened (see the sidecar's log)"
                if self._broken
                else "no prediction log to join labels to: set feedback.store"
            )
            raise FeedbackError(503, reason)
        # Fail fast while the database is away, rather than queue behind a reconnect.
        if (down := self._log.unavailable) is not None:
            raise FeedbackError(503, f"the prediction log's store is unreachable: {down}")
        try:
            return await asyncio.wrap_future(self._log.run(functools.partial(self._join, items)))
        except LogBusy as exc:
            raise FeedbackError(503, str(exc)) from None
        except StoreUnavailable as exc:
            raise FeedbackError(503, f"the prediction log's store is unreachable: {exc}") from None
        except sqlite3.Error as exc:
            log.warning("a feedback join failed", exc_info=True)
            raise FeedbackError(503, f"the prediction log failed: {exc}") from None

    def _cbpe_children(self, model: tuple[str, str]) -> tuple[Counter, Counter]:
        children = self._cbpe.get(model)
        if children is None:
            children = self._cbpe[model] = (
                self._expected.labels(*model),
                self._expected_rows.labels(*model),
            )
        return children

    # --- on the prediction log's thread ----------------------------------------------------------

    def _join(self, items: Sequence[FeedbackItem], store: PredictionStore) -> dict[str, int]:
        now = self._clock()
        counts = dict.fromkeys(RESULTS, 0)
        results: list[tuple[tuple[str, str], str]] = []
        changes: list[NewLabel] = []
        with store.transaction():
            # One lookup for the whole call: a shared database is a round trip away.
            rows = store.find((item.request_id, item.row) for item in items)
            for item in items:
                found = rows.get((item.request_id, item.row))
                result, change = self._match(found, item)
                # The same label again is a no-op, so replaying a call changes no figure.
                if change is not None and not _same_label(change):
                    changes.append(change)
                    # A later item of this call for the same row finds this label, as it would
                    # had it been posted in a call of its own.
                    rows[item.request_id, item.row] = change.found._replace(
                        label=change.label, label_value=change.label_value, labelled_at=now
                    )
                model = (
                    self._default_model
                    if found is None
                    else (found.model_name, found.model_version)
                )
                results.append((model, result))
                counts[result] += 1
            # The row keeps the call's last label for it.
            store.set_labels(list({new.found.id: new for new in changes}.values()), now)
        # Counted after the commit, so a failed transaction counts nothing.
        for model, result in results:
            self._feedback.labels(*model, result).inc()
        for change in changes:
            self._count(change)
        return counts

    def _match(self, found: StoredRow | None, item: FeedbackItem) -> tuple[str, NewLabel | None]:
        if found is None:
            return "unmatched", None
        if found.predicted is not None:
            change = NewLabel(found, class_label(item.label, self._class_names), None)
        elif found.value is not None and (number := value_label(item.label)) is not None:
            change = NewLabel(found, None, number)
        else:
            return "invalid", None
        return ("matched" if found.labelled_at is None else "duplicate"), change

    def _count(self, change: NewLabel) -> None:
        found = change.found
        model = (found.model_name, found.model_version)
        segment = self._fold_segment(model, found.segment) if self._settings.segment else ""
        if found.labelled_at is not None:
            self._count_one(model, segment, found, found.label, found.label_value, replaced=True)
        self._count_one(model, segment, found, change.label, change.label_value, replaced=False)

    def _count_one(
        self,
        model: tuple[str, str],
        segment: str,
        found: StoredRow,
        label: str | None,
        label_value: float | None,
        *,
        replaced: bool,
    ) -> None:
        if label is not None and found.predicted is not None:
            correct = "true" if label == found.predicted else "false"
            cell = (self._fold_class(model, label), self._fold_class(model, found.predicted))
            key = (*model, *cell, correct, segment)
            # Both series exist from the first label on, so the rules can subtract them.
            added, taken = self._labelled.labels(*key), self._replaced.labels(*key)
            (taken if replaced else added).inc()
        elif label_value is not None and found.value is not None:
            error = abs(found.value - label_value)
            family = self._regression_replaced if replaced else self._regression
            for stat, amount in zip(REGRESSION_STATS, (1.0, error, error * error), strict=True):
                self._regression.labels(*model, segment, stat)
                self._regression_replaced.labels(*model, segment, stat)
                family.labels(*model, segment, stat).inc(amount)

    def _refresh(self, store: PredictionStore, now: float) -> None:
        if self._gauges is not None:
            self._gauges.refresh(store, now)

    def _fold_class(self, model: tuple[str, str], name: str) -> str:
        cap = self._class_caps.get(model)
        if cap is None:
            cap = self._class_caps[model] = self._cap("class")
        return cap.fold(name)

    def _fold_segment(self, model: tuple[str, str], value: str | None) -> str:
        cap = self._segment_caps.get(model)
        if cap is None:
            cap = self._segment_caps[model] = self._cap("segment")
        return cap.fold(value or MISSING_SEGMENT)


def _same_label(change: NewLabel) -> bool:
    found = change.found
    return found.labelled_at is not None and (found.label, found.label_value) == (
        change.label,
        change.label_value,
    )


def _row_count(extraction: Extraction) -> int:
    outputs = extraction.outputs
    sizes = [
        a.shape[0] for a in (outputs.classes, outputs.confidence, outputs.value) if a is not None
    ]
    if extraction.features is not None:
        sizes.append(extraction.features.n_rows)
    return max(sizes, default=0)


def _mapping_class_names(config: Config) -> tuple[str, ...] | None:
    """Class names for index labels: the top-level mapping's, else the first route's that has
    them."""
    mappings = [config.mapping, *(route.mapping for route in config.routes)]
    for mapping in mappings:
        if mapping is not None and mapping.class_names:
            return mapping.class_names
    return None
