"""Quality figures on synthetic models whose truth the test knows: the label-free CBPE estimate on
calibrated and overconfident classifiers, and MAE/RMSE of a regression, per segment."""

from __future__ import annotations

import json
import math
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.config import RouteConfig
from sidecar.demo.model import serve_app
from sidecar.extract.spec import MappingSpec
from sidecar.feedback.settings import FeedbackSettings
from tests.conftest import StartSidecar, scrape, scrape_until
from tests.test_feedback import (
    assert_matches_reference,
    logged,
    post_feedback,
    post_shuffled,
    reference_scores,
    value,
)

CLASSES = ("a", "b", "c")
REGIONS = ("eu", "us")
ROWS = 10_000
BATCH = 100


async def _echo(request: web.Request) -> web.Response:
    """A 'model' that answers whatever probabilities or values the request carries."""
    payload = await request.json()
    return web.json_response({"predictions": payload["answer"]})


@pytest.fixture
async def echo_model() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/predict", _echo)
    async with serve_app(app) as url:
        yield url


def echo_settings(store: Path, mapping: MappingSpec, **feedback: Any) -> dict[str, Any]:
    route = RouteConfig(name="predict", method="POST", path="/predict", mapping=mapping)
    settings = FeedbackSettings(
        store=str(store), refresh_seconds=0.05, window_rows=(ROWS,), segment="region", **feedback
    )
    return {"routes": (route,), "model_name": "synthetic", "feedback": settings}


async def send(sidecar: Sidecar, features: list[list[Any]], answers: list[Any]) -> list[str]:
    """POST rows in batches of BATCH with their scripted answers; return the request ids."""
    ids = []
    async with aiohttp.ClientSession() as session:
        for start in range(0, len(features), BATCH):
            request_id = f"s-{start:06d}"
            body = {
                "instances": features[start : start + BATCH],
                "answer": answers[start : start + BATCH],
            }
            headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
            async with session.post(
                f"{sidecar.proxy_url}/predict", data=json.dumps(body), headers=headers
            ) as response:
                assert response.status == 200
            ids.append(request_id)
    return ids


def calibrated(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities, and labels drawn from exactly those probabilities: calibrated by design."""
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet([0.7, 0.7, 0.7], size=ROWS)
    labels = (rng.random(ROWS)[:, None] < probabilities.cumsum(axis=1)).argmax(axis=1)
    return probabilities, labels


async def cbpe_estimate(sidecar: Sidecar) -> float:
    text = await scrape_until(sidecar, lambda t: value(t, "ml_expected_correct_rows_total") == ROWS)
    labels = {"model_name": "synthetic"}
    expected = value(text, "ml_expected_correct_total", **labels)
    return expected / value(text, "ml_expected_correct_rows_total", **labels)


# Echoed rows carry a region (a segment) and their probabilities.
REGION_MAPPING = MappingSpec(
    features="instances",
    feature_names=("region",),
    probabilities="predictions",
    class_names=CLASSES,
)


async def test_cbpe_is_within_002_of_accuracy_when_calibrated(
    echo_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """On a calibrated classifier, expected accuracy from confidences is within 0.02 of the true
    accuracy over 10,000 rows, and of what the labels, once posted, say; per region as well."""
    sidecar = await start_sidecar(echo_model, **echo_settings(tmp_path / "l.db", REGION_MAPPING))
    probabilities, labels = calibrated(seed=11)
    pick = random.Random(13)
    regions = [[pick.choice(REGIONS)] for _ in range(ROWS)]
    ids = await send(sidecar, regions, probabilities.tolist())
    estimate = await cbpe_estimate(sidecar)
    predicted = probabilities.argmax(axis=1)
    truth = float((predicted == labels).mean())
    assert abs(estimate - truth) < 0.02
    assert estimate == pytest.approx(probabilities.max(axis=1).mean(), abs=1e-9)

    await logged(sidecar, ROWS)
    items = [
        {"request_id": ids[i // BATCH], "row": i % BATCH, "label": int(labels[i])}
        for i in range(ROWS)
    ]
    assert (await post_shuffled(sidecar, items, random.Random(12)))["matched"] == ROWS
    window = f"{ROWS}_rows"
    text = await scrape_until(
        sidecar, lambda t: value(t, "ml_labelled_rows", window=window, segment="") == ROWS
    )
    names = [CLASSES[k] for k in labels]
    guesses = [CLASSES[k] for k in predicted]
    assert_matches_reference(text, names, guesses, window, model="synthetic", classes=CLASSES)
    for region in REGIONS:
        rows = [i for i in range(ROWS) if regions[i][0] == region]
        expected = reference_scores([names[i] for i in rows], [guesses[i] for i in rows])
        got = value(text, "ml_accuracy", window=window, segment=region)
        assert got == pytest.approx(expected["accuracy"], abs=1e-12)
        cells = {"model_name": "synthetic", "segment": region, "correct": "true"}
        hits = sum(value(text, "ml_labelled_total", **cells, **{"class": c}) for c in CLASSES)
        assert hits == sum(names[i] == guesses[i] for i in rows)


async def test_cbpe_overestimates_an_overconfident_classifier(
    echo_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """The documented caveat: sharpen the same probabilities (same predictions, same accuracy,
    higher confidence) and the estimate overshoots the true accuracy by far more than 0.02."""
    sidecar = await start_sidecar(echo_model, **echo_settings(tmp_path / "l.db", REGION_MAPPING))
    probabilities, labels = calibrated(seed=11)
    sharpened = probabilities**4
    sharpened /= sharpened.sum(axis=1, keepdims=True)
    await send(sidecar, [[REGIONS[0]]] * ROWS, sharpened.tolist())
    estimate = await cbpe_estimate(sidecar)
    truth = float((sharpened.argmax(axis=1) == labels).mean())
    assert estimate - truth > 0.15


async def test_regression_mae_and_rmse_overall_and_per_segment(
    echo_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """Values and numeric labels give MAE and RMSE equal to numpy's, overall and per region, and
    the error counters hold the same sums."""
    mapping = MappingSpec(features="instances", feature_names=("x", "region"), value="predictions")
    sidecar = await start_sidecar(echo_model, **echo_settings(tmp_path / "l.db", mapping))
    rng = np.random.default_rng(21)
    values = rng.normal(100.0, 20.0, 2_000)
    labels = values + rng.normal(0.0, 5.0, 2_000)
    regions = [REGIONS[i % 3 == 0] for i in range(2_000)]
    features = [[float(i), regions[i]] for i in range(2_000)]
    ids = await send(sidecar, features, values.tolist())
    await logged(sidecar, 2_000)
    items = [
        # Numbers as JSON numbers and as strings: both are numeric labels.
        {"request_id": ids[i // BATCH], "row": i % BATCH, "label": _spell(labels[i], i)}
        for i in range(2_000)
    ]
    assert (await post_shuffled(sidecar, items, random.Random(22)))["matched"] == 2_000
    text = await scrape_until(sidecar, lambda t: value(t, "ml_labelled_rows", segment="") == 2_000)
    errors = values - labels
    for segment in ("", *REGIONS):
        rows = [i for i in range(2_000) if segment in ("", regions[i])]
        mae = float(np.abs(errors[rows]).mean())
        rmse = math.sqrt(float((errors[rows] ** 2).mean()))
        window = {"window": f"{ROWS}_rows", "segment": segment}
        assert value(text, "ml_mae", **window) == pytest.approx(mae, rel=1e-9)
        assert value(text, "ml_rmse", **window) == pytest.approx(rmse, rel=1e-9)

    def summed(stat: str) -> float:
        return sum(
            value(text, "ml_regression_labelled_total", segment=r, stat=stat) for r in REGIONS
        )

    assert summed("rows") == 2_000
    assert summed("absolute_error") == pytest.approx(float(np.abs(errors).sum()), rel=1e-9)
    assert summed("squared_error") == pytest.approx(float((errors**2).sum()), rel=1e-9)
    assert "ml_accuracy{" not in text  # a regression has no classification figures


def _spell(number: float, index: int) -> float | str:
    return repr(float(number)) if index % 2 else float(number)


async def test_labels_that_do_not_fit_the_row_are_invalid(
    echo_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """Text for a regression row is counted as invalid, not stored."""
    mapping = MappingSpec(features="instances", value="predictions")
    sidecar = await start_sidecar(echo_model, **echo_settings(tmp_path / "l.db", mapping))
    ids = await send(sidecar, [[1.0]], [3.5])
    await logged(sidecar, 1)
    status, body = await post_feedback(sidecar, {"request_id": ids[0], "label": "expensive"})
    assert (status, body["invalid"]) == (200, 1)
    text = await scrape(sidecar)
    assert value(text, "ml_feedback_total", model_name="synthetic", result="invalid") == 1
