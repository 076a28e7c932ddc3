"""The prediction log's parts without a server: the stores' bounds (the SQLite file and a real
PostgreSQL database, held to the same contract), the writer's bounded queue, label spelling, and
the classification arithmetic."""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from sidecar.extract.types import FeatureTable, Outputs
from sidecar.feedback import log as log_module
from sidecar.feedback.log import (
    PendingPrediction,
    PredictionBatch,
    PredictionLog,
    expand,
    expand_batch,
    open_store,
)
from sidecar.feedback.recorder import class_label, value_label
from sidecar.feedback.settings import FeedbackSettings
from sidecar.feedback.sqlite import SQLiteStore
from sidecar.feedback.stats import classification_scores, window_name
from sidecar.feedback.store import LoggedRow, NewLabel, PredictionStore, StoredRow
from tests.test_feedback import reference_scores

OpenStore = Callable[..., PredictionStore]


def rows(count: int, ts: float, prefix: str = "r") -> list[LoggedRow]:
    return [
        LoggedRow(f"{prefix}{i}", 0, ts + i, "m", "1", "a", 0.9, None, None, None, 1.0)
        for i in range(count)
    ]


@pytest.fixture(params=["sqlite", "postgres"])
def open_at(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens a store at one place (a file, or a fresh database) each time it is called, with the
    bounds given; every store it opened is closed at the end."""
    if request.param == "postgres":
        location = request.getfixturevalue("postgres_url")
    else:
        location = str(tmp_path / "s.db")
    opened: list[PredictionStore] = []

    def open_store_at(*, max_rows: int, max_age_seconds: float) -> PredictionStore:
        settings = FeedbackSettings(
            store=location, max_rows=max_rows, max_age_seconds=max_age_seconds
        )
        opened.append(open_store(settings))
        return opened[-1]

    yield open_store_at
    for store in opened:
        store.close()


def find(store: PredictionStore, request_id: str) -> StoredRow | None:
    return store.find([(request_id, 0)]).get((request_id, 0))


def label(store: PredictionStore, request_id: str, text: str, now: float) -> None:
    found = find(store, request_id)
    assert found is not None
    with store.transaction():
        store.set_labels([NewLabel(found, text, None)], now)


def test_age_bound_removes_the_oldest_rows_and_says_how_many(open_at: OpenStore) -> None:
    """Rows older than max_age_seconds go, oldest first, and are reported as max_age."""
    store = open_at(max_rows=1000, max_age_seconds=100.0)
    store.append(rows(10, ts=1000.0))
    assert store.evict(now=1009.0) == {"max_age": 0, "max_rows": 0}
    # At 1105, rows stamped before 1005 (the first five) are older than 100 s.
    assert store.evict(now=1105.0) == {"max_age": 5, "max_rows": 0}
    assert store.rows == 5
    assert find(store, "r4") is None
    assert find(store, "r5") is not None


def test_row_bound_keeps_the_newest_rows(open_at: OpenStore) -> None:
    """Beyond max_rows the oldest rows go first, across batches."""
    store = open_at(max_rows=7, max_age_seconds=1e9)
    store.append(rows(5, ts=0.0, prefix="a"))
    assert store.evict(now=10.0)["max_rows"] == 0
    store.append(rows(5, ts=5.0, prefix="b"))
    assert store.evict(now=10.0)["max_rows"] == 3
    assert [find(store, f"a{i}") is None for i in range(5)] == [True] * 3 + [False] * 2
    assert store.rows == 7


def test_store_survives_reopening_with_its_labels(open_at: OpenStore) -> None:
    """Rows, labels and the set of labelled models are read back by the next process."""
    store = open_at(max_rows=10, max_age_seconds=1e9)
    store.append(rows(3, ts=0.0))
    label(store, "r1", "b", now=5.0)
    store.close()
    again = open_at(max_rows=10, max_age_seconds=1e9)
    assert again.rows == 3
    assert again.labelled_models() == {("m", "1")}
    reread = find(again, "r1")
    assert reread is not None
    assert (reread.label, reread.labelled_at) == ("b", 5.0)


def test_find_takes_the_newest_row_of_a_repeated_request_id(open_at: OpenStore) -> None:
    """A request id logged twice (a client reusing ids) joins to its latest row; keys without a
    row are left out of the answer."""
    store = open_at(max_rows=10, max_age_seconds=1e9)
    first, second = rows(1, ts=0.0), rows(1, ts=1.0)
    store.append([first[0]._replace(predicted="old")])
    store.append([second[0]._replace(predicted="new")])
    found = store.find([("r0", 0), ("r0", 0), ("r0", 1), ("nothing", 0)])
    assert list(found) == [("r0", 0)]
    assert found["r0", 0].predicted == "new"


def test_store_is_in_wal_mode(tmp_path: Path) -> None:
    """The journal is a write-ahead log: readers never block the writer."""
    SQLiteStore(str(tmp_path / "s.db"), max_rows=10, max_age_seconds=1.0).close()
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_window_of_rows_takes_the_most_recently_labelled(open_at: OpenStore) -> None:
    """`last_rows` counts labelled rows by when their label arrived, newest first."""
    store = open_at(max_rows=100, max_age_seconds=1e9)
    store.append(rows(4, ts=0.0))
    for index, (name, text) in enumerate([("r0", "a"), ("r1", "b"), ("r2", "b")]):
        label(store, name, text, now=10.0 + index)
    groups = store.window(("m", "1"), last_rows=2)
    assert [(g.label, g.predicted, g.rows) for g in groups] == [("b", "a", 2)]
    since = store.window(("m", "1"), since=10.0)
    assert sorted((g.label, g.rows) for g in since) == [("a", 1), ("b", 2)]


def log_metrics() -> tuple[CollectorRegistry, Counter, Gauge]:
    registry = CollectorRegistry()
    dropped = Counter("dropped", "d", ["reason"], registry=registry)
    return registry, dropped, Gauge("up", "u", registry=registry)


def one_exchange(request_id: str, outputs: Outputs, rows: int, ts: float = 0.0) -> PredictionBatch:
    return PredictionBatch(ts, ("m", "1"), outputs, None, [request_id], [1.0], [0], [rows])


def test_full_queue_drops_and_counts_rows() -> None:
    """The writer's queue holds queue_rows rows; a prediction that does not fit is dropped and
    its rows counted as prediction_log_full."""
    registry, dropped, up = log_metrics()
    log = PredictionLog(FeedbackSettings(queue_rows=10), registry=registry, dropped=dropped, up=up)
    outputs = Outputs(classes=np.array(["a"] * 4, dtype=object))
    for index in range(3):  # 4 + 4 fit, the next 4 do not (the thread is not running)
        log.submit(one_exchange(f"r{index}", outputs, 4))
    assert registry.get_sample_value("dropped_total", {"reason": "prediction_log_full"}) == 4


def test_a_batch_that_does_not_fit_keeps_the_exchanges_that_do() -> None:
    """Exchanges submitted together are dropped one by one, as if each had come alone: one that
    does not fit goes, a smaller one after it may still fit."""
    registry, dropped, up = log_metrics()
    log = PredictionLog(FeedbackSettings(queue_rows=6), registry=registry, dropped=dropped, up=up)
    outputs = Outputs(classes=np.array(["a"] * 10, dtype=object))
    ids, latencies = ["a", "b", "c", "d"], [1.0] * 4
    log.submit(
        PredictionBatch(0.0, ("m", "1"), outputs, None, ids, latencies, [0, 4, 7, 9], [4, 3, 2, 1])
    )
    # a (4 rows) fits, b (3) does not, c (2) does, d (1) does not.
    assert registry.get_sample_value("dropped_total", {"reason": "prediction_log_full"}) == 4


def test_rows_gather_between_writes_but_a_join_does_not_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a write the writer lets rows gather for WRITE_DELAY; a join queued meanwhile has the
    rows queued before it written first, at once, and finds them."""
    monkeypatch.setattr(log_module, "WRITE_DELAY", 3600.0)
    registry, dropped, up = log_metrics()
    settings = FeedbackSettings(store=str(tmp_path / "s.db"))
    log = PredictionLog(settings, registry=registry, dropped=dropped, up=up)
    log.start()
    try:
        outputs = Outputs(classes=np.array(["a"], dtype=object))
        # After a quiet spell: written at once (and now, not aged out at once).
        log.submit(one_exchange("first", outputs, 1, time.time()))
        deadline = time.monotonic() + 30
        while registry.get_sample_value("sidecar_prediction_log_written_total") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        log.submit(one_exchange("second", outputs, 1, time.time()))  # waits for an hour
        time.sleep(0.2)
        assert registry.get_sample_value("sidecar_prediction_log_written_total") == 1
        found = log.run(lambda store: store.find([("first", 0), ("second", 0)]))
        assert set(found.result(timeout=30)) == {("first", 0), ("second", 0)}
    finally:
        log.stop()


def test_a_failing_store_counts_its_rows_and_keeps_going(tmp_path: Path) -> None:
    """A batch the store refuses (disk full) is counted as prediction_log_error; the thread
    carries on and writes the next batch."""
    registry, dropped, up = log_metrics()
    settings = FeedbackSettings(store=str(tmp_path / "s.db"))
    log = PredictionLog(settings, registry=registry, dropped=dropped, up=up)
    log.start()
    assert log.store is not None
    append, failed = log.store.append, threading.Event()

    def full_disk(rows: object) -> None:
        failed.set()
        raise sqlite3.OperationalError("database or disk is full")

    log.store.append = full_disk  # type: ignore[method-assign]
    outputs = Outputs(classes=np.array(["a"] * 3, dtype=object))
    log.submit(one_exchange("r1", outputs, 3))
    assert failed.wait(timeout=30)
    log.store.append = append  # type: ignore[method-assign]
    log.submit(one_exchange("r2", outputs, 3))
    log.stop()
    assert registry.get_sample_value("dropped_total", {"reason": "prediction_log_error"}) == 3
    assert registry.get_sample_value("sidecar_prediction_log_written_total") == 3


def test_expand_unpacks_a_batch_into_rows() -> None:
    """Classes, confidences, features and segments line up by row; nulls stay null."""
    table = FeatureTable(
        columns=("x", "region"),
        numeric=np.array([[1.5, np.nan], [np.nan, np.nan]]),
        missing=np.array([[False, False], [True, True]]),
        non_numeric=np.array([[False, True], [False, False]]),
        strings={"region": np.array(["eu", None], dtype=object)},
    )
    outputs = Outputs(
        classes=np.array(["a", None], dtype=object), confidence=np.array([0.75, np.nan])
    )
    prediction = PendingPrediction(5.0, "q", ("m", "1"), outputs, table, 2.0, 2)
    first, second = expand(prediction, features=True, segment="region")
    assert (first.predicted, first.confidence, first.segment) == ("a", 0.75, "eu")
    assert first.features == '{"x":1.5,"region":"eu"}'
    assert (second.predicted, second.confidence, second.segment) == (None, None, "__missing__")
    assert second.features == '{"x":null,"region":null}'
    assert expand(prediction, features=False, segment=None)[0].features is None


def test_a_batch_gives_the_rows_its_exchanges_give_alone() -> None:
    """expand_batch cuts the arrays for all the exchanges at once, skipping those not logged: the
    rows are those of each exchange expanded on its own, in order."""
    rng = np.random.default_rng(3)
    table = FeatureTable(
        columns=("x", "region"),
        numeric=rng.normal(size=(7, 2)),
        missing=np.zeros((7, 2), dtype=bool),
        non_numeric=np.zeros((7, 2), dtype=bool),
    )
    outputs = Outputs(
        classes=np.array(list("abcabca"), dtype=object), confidence=rng.uniform(size=7)
    )
    # Rows 0-1, 2, 3-5 and 6; the second exchange is not logged (say, not sampled).
    batch = PredictionBatch(
        5.0, ("m", "1"), outputs, table, ["p", "r", "s"], [1.0, 2.0, 3.0], [0, 3, 6], [2, 3, 1]
    )
    rows = expand_batch(batch, features=True, segment="region")
    alone = [
        row
        for exchange in batch.exchanges()
        for row in expand(exchange, features=True, segment="region")
    ]
    assert rows == alone
    assert [(row.request_id, row.row, row.predicted) for row in rows] == [
        ("p", 0, "a"),
        ("p", 1, "b"),
        ("r", 0, "a"),
        ("r", 1, "b"),
        ("r", 2, "c"),
        ("s", 0, "a"),
    ]
    x = table.numeric[:, 0].tolist()
    assert [json.loads(row.features or "")["x"] for row in rows] == [
        x[i] for i in (0, 1, 3, 4, 5, 6)
    ]


@pytest.mark.parametrize(
    ("label", "names", "expected"),
    [
        ("versicolor", ("setosa", "versicolor"), "versicolor"),
        (1, ("setosa", "versicolor"), "versicolor"),
        ("1", ("setosa", "versicolor"), "versicolor"),
        (1.0, ("setosa", "versicolor"), "versicolor"),
        (5, ("setosa", "versicolor"), "5"),
        (1, None, "1"),
        ("1", None, "1"),
        ("cat", None, "cat"),
        ("0", ("0", "zero"), "0"),  # a class literally named "0" wins over index 0
        (0.5, None, "0.5"),
    ],
)
def test_labels_are_spelt_like_predicted_classes(label, names, expected) -> None:
    """Names stay names; indices, as numbers or digits, go through the class names."""
    assert class_label(label, names) == expected


def test_numeric_labels_accept_numbers_and_numeric_text() -> None:
    """Regression labels: numbers or text that reads as a finite number."""
    assert [value_label(v) for v in (2, 2.5, "3.25", "x", "nan")] == [2.0, 2.5, 3.25, None, None]


def test_scores_equal_the_reference_on_random_data() -> None:
    """Accuracy, per-class precision/recall/F1 and macro F1 from a confusion matrix equal the
    long-hand reference, including classes only labelled or only predicted."""
    rng = random.Random(5)
    truth = [rng.choice("abcd") for _ in range(500)]
    guess = [rng.choice("abce") for _ in range(500)]
    matrix: dict[tuple[str, str], int] = {}
    for pair in zip(truth, guess, strict=True):
        matrix[pair] = matrix.get(pair, 0) + 1
    accuracy, scores, macro = classification_scores(matrix)
    expected = reference_scores(truth, guess)
    assert accuracy == pytest.approx(expected["accuracy"], abs=1e-12)
    assert macro == pytest.approx(expected["macro_f1"], abs=1e-12)
    for name, score in scores.items():
        assert (score.precision, score.recall, score.f1) == pytest.approx(expected[name])


def test_window_names() -> None:
    """Time windows are named like PromQL ranges."""
    assert [window_name(s) for s in (3600, 86400, 1800, 90, 0.5)] == [
        "1h",
        "1d",
        "30m",
        "90s",
        "0.5s",
    ]
