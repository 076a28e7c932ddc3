"""Ground truth end to end: a real sidecar in front of a real model server, a real SQLite store,
labels posted to /feedback, and the figures compared with a plain implementation."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from sidecar.app import Sidecar
from sidecar.demo.model import CLASSES
from sidecar.extract.spec import MappingSpec
from sidecar.feedback.settings import FeedbackSettings
from tests.conftest import StartSidecar, assert_sample, sample, scrape, scrape_until

CENTRES = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])


# --- the reference: accuracy, precision, recall and F1 written out the long way ------------------


def reference_scores(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """What scikit-learn's accuracy_score and precision_recall_fscore_support (zero_division=0)
    return, computed by counting."""
    classes = sorted(set(truth) | set(predicted))
    pairs = list(zip(truth, predicted, strict=True))
    scores: dict[str, Any] = {"accuracy": sum(t == p for t, p in pairs) / len(pairs)}
    for name in classes:
        tp = sum(t == name and p == name for t, p in pairs)
        fp = sum(t != name and p == name for t, p in pairs)
        fn = sum(t == name and p != name for t, p in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[name] = (precision, recall, f1)
    scores["macro_f1"] = sum(scores[name][2] for name in classes) / len(classes)
    return scores


def test_reference_matches_a_hand_worked_example() -> None:
    """The reference itself: 2 of 3 right; class b is never predicted."""
    scores = reference_scores(["a", "a", "b"], ["a", "a", "a"])
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["a"] == pytest.approx((2 / 3, 1.0, 0.8))
    assert scores["b"] == (0.0, 0.0, 0.0)
    assert scores["macro_f1"] == pytest.approx(0.4)


# --- fixtures and helpers ------------------------------------------------------------------------


def iris_settings(store: Path | str, **settings: Any) -> dict[str, Any]:
    """A sidecar of the toy iris model logging to `store` (a SQLite path or PostgreSQL URL)."""
    settings.setdefault("refresh_seconds", 0.05)
    settings.setdefault("window_rows", (20_000,))
    return {
        "preset": "kserve-v1",
        "model_name": "iris",
        "mapping": MappingSpec(class_names=CLASSES),
        "feedback": FeedbackSettings(store=str(store), **settings),
    }


def iris_rows(count: int, seed: int) -> tuple[list[list[float]], list[int]]:
    """Rows near one of three centres, spread wide enough that the toy model errs sometimes."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, count)
    rows = CENTRES[truth] + rng.normal(0.0, 0.45, (count, 4))
    return rows.round(3).tolist(), truth.tolist()


async def predict(
    sidecar: Sidecar, rows: list[list[float]], batch: int, prefix: str = "req"
) -> list[tuple[str, int, str]]:
    """POST the rows in batches with known request ids; (request id, row, predicted class)."""
    url = f"{sidecar.proxy_url}/v1/models/iris:predict"
    limit = asyncio.Semaphore(8)

    async def one(session: aiohttp.ClientSession, start: int) -> list[tuple[str, int, str]]:
        request_id = f"{prefix}-{start:06d}"
        body = json.dumps({"instances": rows[start : start + batch]})
        headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
        async with limit, session.post(url, data=body, headers=headers) as response:
            assert response.status == 200
            assert response.headers["X-Request-ID"] == request_id
            answer = await response.json()
        return [
            (request_id, row, CLASSES[int(np.argmax(probabilities))])
            for row, probabilities in enumerate(answer["predictions"])
        ]

    async with aiohttp.ClientSession() as session:
        parts = await asyncio.gather(*(one(session, s) for s in range(0, len(rows), batch)))
    return [item for part in parts for item in part]


async def post_feedback(
    sidecar: Sidecar, body: Any, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sidecar.admin_url}/feedback", json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


def value(text: str, name: str, **labels: str) -> float:
    found = sample(text, name, **labels)
    return 0.0 if found is None else found


async def logged(sidecar: Sidecar, rows: int) -> str:
    return await scrape_until(
        sidecar, lambda t: value(t, "sidecar_prediction_log_written_total") >= rows
    )


def label_forms(truth: list[int], rng: random.Random) -> list[str | int]:
    """The same labels spelt three ways: class names, indices, and indices as strings."""
    forms: list[str | int] = []
    for index in truth:
        form = rng.randrange(3)
        forms.append(CLASSES[index] if form == 0 else index if form == 1 else str(index))
    return forms


async def post_shuffled(
    sidecar: Sidecar, items: list[dict[str, Any]], rng: random.Random
) -> Counter[str]:
    """Post the items in random order, in batches of random sizes (single objects too)."""
    items = items[:]
    rng.shuffle(items)
    totals: Counter[str] = Counter()
    start = 0
    while start < len(items):
        size = rng.choice((1, 7, 250, 1000, 3000))
        chunk = items[start : start + size]
        status, counts = await post_feedback(sidecar, chunk[0] if size == 1 else chunk)
        assert status == 200, counts
        totals.update(counts)
        start += size
    return totals


def assert_matches_reference(
    text: str,
    truth: list[str],
    predicted: list[str],
    window: str,
    *,
    model: str = "iris",
    classes: Sequence[str] = CLASSES,
) -> None:
    """The window's gauges equal the reference computed on the same rows."""
    expected = reference_scores(truth, predicted)
    labels = {"model_name": model, "window": window, "segment": ""}
    assert value(text, "ml_labelled_rows", **labels) == len(truth)
    assert value(text, "ml_accuracy", **labels) == pytest.approx(expected["accuracy"], abs=1e-12)
    assert value(text, "ml_macro_f1", **labels) == pytest.approx(expected["macro_f1"], abs=1e-12)
    for name in classes:
        got = tuple(
            value(text, metric, **labels, **{"class": name})
            for metric in ("ml_precision", "ml_recall", "ml_f1")
        )
        assert got == pytest.approx(expected[name], abs=1e-12), name


# --- the tests -----------------------------------------------------------------------------------


async def test_labels_for_10000_predictions_give_the_reference_figures(
    toy_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """10,000 rows in batches, labels posted shuffled in mixed spellings: accuracy, per-class
    precision, recall and F1 and macro F1 equal the reference; the counters hold the same matrix."""
    sidecar = await start_sidecar(toy_model, **iris_settings(tmp_path / "log.db"))
    rows, truth = iris_rows(10_000, seed=1)
    predictions = await predict(sidecar, rows, batch=10)
    await logged(sidecar, 10_000)

    rng = random.Random(2)
    forms = label_forms(truth, rng)
    items = [
        {"request_id": request_id, "row": row, "label": forms[index]}
        for index, (request_id, row, _) in enumerate(predictions)
    ]
    totals = await post_shuffled(sidecar, items, rng)
    assert totals == {"matched": 10_000, "unmatched": 0, "duplicate": 0, "invalid": 0}

    names = [CLASSES[t] for t in truth]
    guessed = [p for _, _, p in predictions]
    text = await scrape_until(
        sidecar, lambda t: value(t, "ml_labelled_rows", window="20000_rows") == 10_000
    )
    assert_matches_reference(text, names, guessed, "20000_rows")
    assert_sample(text, "ml_feedback_total", 10_000, model_name="iris", result="matched")
    matrix = Counter(zip(names, guessed, strict=True))
    for (label, guess), count in matrix.items():
        cell = {
            "class": label,
            "predicted": guess,
            "correct": "true" if label == guess else "false",
        }
        assert_sample(text, "ml_labelled_total", count, model_name="iris", **cell)
    assert 0.5 < value(text, "ml_accuracy", window="20000_rows") < 1.0  # the model errs


async def test_labels_still_match_after_a_restart(
    toy_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """Predictions logged by one sidecar are labelled through the next one on the same store."""
    store = tmp_path / "log.db"
    first = await start_sidecar(toy_model, **iris_settings(store))
    rows, truth = iris_rows(2_000, seed=3)
    predictions = await predict(first, rows, batch=8)
    await logged(first, 2_000)
    await first.stop()

    second = await start_sidecar(toy_model, **iris_settings(store))
    text = await scrape(second)
    assert value(text, "sidecar_prediction_log_rows") == 2_000
    rng = random.Random(4)
    items = [
        {"request_id": request_id, "row": row, "label": CLASSES[truth[index]]}
        for index, (request_id, row, _) in enumerate(predictions)
    ]
    assert (await post_shuffled(second, items, rng))["matched"] == 2_000
    text = await scrape_until(
        second, lambda t: value(t, "ml_labelled_rows", window="20000_rows") == 2_000
    )
    names = [CLASSES[t] for t in truth]
    assert_matches_reference(text, names, [p for _, _, p in predictions], "20000_rows")


async def test_row_bound_evicts_the_oldest_and_counts_them(
    toy_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """With max_rows=100, 150 rows leave the newest 100: labels for the first 50 are unmatched."""
    sidecar = await start_sidecar(toy_model, **iris_settings(tmp_path / "log.db", max_rows=100))
    rows, truth = iris_rows(150, seed=5)
    predictions = []
    for start in range(0, 150, 5):  # one request at a time, so their order is the log's order
        predictions += await predict(sidecar, rows[start : start + 5], 5, prefix=f"r{start:03d}")
    text = await logged(sidecar, 150)
    assert value(text, "sidecar_prediction_log_rows") == 100
    assert value(text, "sidecar_prediction_log_evicted_total", reason="max_rows") == 50
    assert value(text, "sidecar_prediction_log_evicted_total", reason="max_age") == 0

    items = [
        {"request_id": request_id, "row": row, "label": CLASSES[truth[index]]}
        for index, (request_id, row, _) in enumerate(predictions)
    ]
    status, oldest = await post_feedback(sidecar, items[:50])
    assert (status, oldest["unmatched"], oldest["matched"]) == (200, 50, 0)
    status, newest = await post_feedback(sidecar, items[50:])
    assert (status, newest["unmatched"], newest["matched"]) == (200, 0, 100)
    text = await scrape(sidecar)
    assert_sample(text, "ml_feedback_total", 50, model_name="iris", result="unmatched")


async def test_duplicate_labels_replace_the_earlier_ones(
    toy_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """A second label for a row replaces the first in the figures, and labelled minus replaced
    counters give the current matrix."""
    sidecar = await start_sidecar(toy_model, **iris_settings(tmp_path / "log.db"))
    rows, truth = iris_rows(300, seed=6)
    predictions = await predict(sidecar, rows, batch=3)
    await logged(sidecar, 300)
    wrong = [{"request_id": r, "row": n, "label": CLASSES[0]} for r, n, _ in predictions]
    right = [
        {"request_id": r, "row": n, "label": truth[index]}
        for index, (r, n, _) in enumerate(predictions)
    ]
    assert (await post_feedback(sidecar, wrong))[1]["matched"] == 300
    assert (await post_feedback(sidecar, right))[1]["duplicate"] == 300

    names, guessed = [CLASSES[t] for t in truth], [p for _, _, p in predictions]
    expected = reference_scores(names, guessed)
    text = await scrape_until(
        sidecar,
        lambda t: (
            value(t, "ml_accuracy", window="20000_rows")
            == pytest.approx(expected["accuracy"], abs=1e-12)
        ),
    )
    assert_matches_reference(text, names, guessed, "20000_rows")
    assert_sample(text, "ml_feedback_total", 300, model_name="iris", result="matched")
    assert_sample(text, "ml_feedback_total", 300, model_name="iris", result="duplicate")
    matrix = Counter(zip(names, guessed, strict=True))
    for label in CLASSES:
        for guess in CLASSES:
            cell = {"class": label, "predicted": guess, "model_name": "iris"}
            net = value(text, "ml_labelled_total", **cell) - value(
                text, "ml_labelled_replaced_total", **cell
            )
            assert net == matrix[label, guess], (label, guess)


async def test_feedback_and_traffic_at_the_same_time(
    toy_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """Labels posted while predictions still flow: every label finds its row once the row is
    logged, nothing is dropped, and the final figures equal the reference."""
    sidecar = await start_sidecar(toy_model, **iris_settings(tmp_path / "log.db"))
    rows, truth = iris_rows(3_000, seed=7)
    done: list[tuple[str, int, str]] = []
    posted: Counter[str] = Counter()

    async def traffic() -> None:
        for start in range(0, 3_000, 300):
            done.extend(await predict(sidecar, rows[start : start + 300], 6, f"c{start:04d}"))

    async def labels() -> None:
        sent = 0
        while sent < 3_000:
            if sent == len(done):
                await asyncio.sleep(0.01)
                continue
            chunk, sent = done[sent:], len(done)
            items = [{"request_id": r, "row": n, "label": _truth(r, n, truth)} for r, n, _ in chunk]
            status, counts = await post_feedback(sidecar, items)
            assert status == 200
            posted.update(counts)

    await asyncio.gather(traffic(), labels())
    assert posted["matched"] + posted["unmatched"] == 3_000
    await logged(sidecar, 3_000)
    # Labels that raced ahead of their rows: posting them again now finds every one.
    late = [{"request_id": r, "row": n, "label": _truth(r, n, truth)} for r, n, _ in done]
    status, counts = await post_feedback(sidecar, late)
    assert status == 200
    assert counts["matched"] == posted["unmatched"]
    assert counts["duplicate"] == posted["matched"]
    text = await scrape_until(
        sidecar, lambda t: value(t, "ml_labelled_rows", window="20000_rows") == 3_000
    )
    order = sorted(done)
    assert_matches_reference(
        text, [_truth(r, n, truth) for r, n, _ in order], [p for _, _, p in order], "20000_rows"
    )
    assert value(text, "sidecar_dropped_observations_total", reason="prediction_log_full") == 0


def _truth(request_id: str, row: int, truth: list[int]) -> str:
    """The true class of a row of `predict(..., batch=6, prefix=cNNNN)` from its request id."""
    base, start = request_id[1:].split("-")
    return CLASSES[truth[int(base) + int(start) + row]]
