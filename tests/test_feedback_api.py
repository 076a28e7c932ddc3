"""POST /feedback's contract on a real sidecar: token, errors, limits, a store that will not open,
and the JSON Lines copy of the prediction log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.config import load
from sidecar.feedback.recorder import MAX_ITEMS
from sidecar.feedback.settings import FeedbackSettings
from tests.conftest import StartSidecar, scrape, scrape_until
from tests.test_feedback import (
    iris_rows,
    iris_settings,
    logged,
    post_feedback,
    predict,
    value,
)


async def test_token_guards_feedback_but_not_metrics(
    toy_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """Without the token or with a wrong one: 401 and a reason; with it: 200. /metrics is open."""
    sidecar = await start_sidecar(toy_model, **iris_settings(tmp_path / "l.db", token="s3cret"))
    item = {"request_id": "nope", "label": 1}
    for token in (None, "wrong", "s3cret-and-more"):
        status, body = await post_feedback(sidecar, item, token)
        assert status == 401
        assert "token" in body["error"]
    status, body = await post_feedback(sidecar, item, "s3cret")
    assert (status, body["unmatched"]) == (200, 1)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sidecar.admin_url}/metrics") as response,
    ):
        assert response.status == 200


def test_token_comes_from_the_environment() -> None:
    """SIDECAR_FEEDBACK_TOKEN sets feedback.token and keeps the file's other feedback keys."""
    environ = {"SIDECAR_UPSTREAM": "http://127.0.0.1:9000", "SIDECAR_FEEDBACK_TOKEN": "t0k"}
    assert load(environ=environ).feedback.token == "t0k"


def test_token_from_the_environment_merges_with_the_file(tmp_path: Path) -> None:
    """The file's feedback section survives; only its token is set by the variable."""
    path = tmp_path / "s.yaml"
    path.write_text("upstream: http://127.0.0.1:9000\nfeedback:\n  max_rows: 5\n  token: file\n")
    config = load(path, environ={"SIDECAR_FEEDBACK_TOKEN": "env"})
    assert (config.feedback.max_rows, config.feedback.token) == (5, "env")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b'{"label": 1}', "request_id"),
        (b'{"request_id": "a"}', "label"),
        (b'{"request_id": "a", "label": null}', "label"),
        (b'{"request_id": "a", "label": true}', "label"),
        (b'{"request_id": "a", "label": 1, "row": -1}', "row"),
        (b'{"request_id": "a", "label": 1, "lable": 2}', "lable"),
        (b'{"request_id": "", "label": 1}', "request_id"),
        (b'[{"request_id": "a", "label": 1}, 7]', "[1]"),
        (b'{"request_id": "a", "label": 1e999}', "out of range"),
        (b'"just a string"', "feedback item"),
    ],
)
async def test_bad_bodies_get_400_with_a_reason(
    toy_model, start_sidecar: StartSidecar, tmp_path: Path, body: bytes, reason: str
):
    """Each malformed body is refused as a whole, with a reason naming what is wrong."""
    sidecar = await start_sidecar(toy_model, **iris_settings(tmp_path / "l.db"))
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sidecar.admin_url}/feedback", data=body) as response,
    ):
        assert response.status == 400
        assert reason in (await response.json())["error"]


async def test_more_than_10000_items_get_413(
    toy_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """10,000 items are fine; 10,001 are refused whole, and nothing of them is counted."""
    sidecar = await start_sidecar(toy_model, **iris_settings(tmp_path / "l.db"))
    items = [{"request_id": f"r{i}", "label": 0} for i in range(MAX_ITEMS + 1)]
    status, body = await post_feedback(sidecar, items)
    assert status == 413
    assert str(MAX_ITEMS) in body["error"]
    status, body = await post_feedback(sidecar, items[:MAX_ITEMS])
    assert (status, body["unmatched"]) == (200, MAX_ITEMS)
    text = await scrape(sidecar)
    assert value(text, "ml_feedback_total", result="unmatched") == MAX_ITEMS


async def test_without_a_store_feedback_is_503_and_metrics_still_count(
    toy_model, start_sidecar: StartSidecar
):
    """The default config keeps no predictions: /feedback says so; CBPE counters still work."""
    settings = {**iris_settings(Path("unused")), "feedback": FeedbackSettings()}
    sidecar = await start_sidecar(toy_model, **settings)
    rows, _ = iris_rows(10, seed=1)
    await predict(sidecar, rows, batch=5)
    status, body = await post_feedback(sidecar, {"request_id": "a", "label": 1})
    assert status == 503
    assert "feedback.store" in body["error"]
    text = await logged_cbpe(sidecar, 10)
    assert value(text, "ml_expected_correct_rows_total", model_name="iris") == 10
    assert value(text, "sidecar_prediction_log_up") == 0


async def logged_cbpe(sidecar: Any, rows: int) -> str:
    return await scrape_until(sidecar, lambda t: value(t, "ml_expected_correct_rows_total") >= rows)


async def test_a_store_that_cannot_open_leaves_the_proxy_serving(
    toy_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """A store path under a regular file cannot be created: the sidecar still relays requests,
    /feedback answers 503 and sidecar_prediction_log_up is 0."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    sidecar = await start_sidecar(toy_model, **iris_settings(blocker / "log.db"))
    rows, _ = iris_rows(4, seed=1)
    assert len(await predict(sidecar, rows, batch=2)) == 4
    status, body = await post_feedback(sidecar, {"request_id": "a", "label": 1})
    assert status == 503
    assert "could not be opened" in body["error"]
    assert value(await scrape(sidecar), "sidecar_prediction_log_up") == 0


@pytest.mark.parametrize("log_features", [True, False])
async def test_json_lines_carry_the_structured_log_fields(
    toy_model, start_sidecar: StartSidecar, tmp_path: Path, log_features: bool
):
    """Every row is one JSON line with timestamp, request_id, model_name, model_version,
    prediction, probability, latency_ms, and features unless they are opted out."""
    path = tmp_path / "predictions.jsonl"
    settings = iris_settings(tmp_path / "l.db", jsonl=str(path), log_features=log_features)
    sidecar = await start_sidecar(toy_model, **settings)
    rows, _ = iris_rows(6, seed=1)
    predictions = await predict(sidecar, rows, batch=3)
    await logged(sidecar, 6)
    # The two requests run concurrently, so their lines may come in either order.
    lines = sorted(
        (json.loads(line) for line in path.read_text().splitlines()),
        key=lambda r: (r["request_id"], r["row"]),
    )
    assert [(r["request_id"], r["row"], r["prediction"]) for r in lines] == sorted(predictions)
    for record in lines:
        assert {"timestamp", "model_name", "model_version", "probability", "latency_ms"} <= set(
            record
        )
        assert record["model_name"] == "iris"
        assert 0.0 < record["probability"] <= 1.0
        assert record["timestamp"].endswith("+00:00")
    if log_features:
        assert [list(r["features"].values()) for r in lines] == rows
    else:
        assert all("features" not in r for r in lines)


async def test_sample_rate_zero_logs_nothing(
    toy_model, start_sidecar: StartSidecar, tmp_path: Path
):
    """sample_rate 0 keeps no rows; labels for them are unmatched, CBPE still counts every row."""
    sidecar = await start_sidecar(toy_model, **iris_settings(tmp_path / "l.db", sample_rate=0.0))
    rows, _ = iris_rows(8, seed=1)
    predictions = await predict(sidecar, rows, batch=4)
    text = await logged_cbpe(sidecar, 8)
    assert value(text, "sidecar_prediction_log_written_total") == 0
    items = [{"request_id": r, "row": n, "label": p} for r, n, p in predictions]
    assert (await post_feedback(sidecar, items))[1]["unmatched"] == 8


def test_settings_reject_impossible_values() -> None:
    """Out-of-range settings fail at load, naming the key."""
    with pytest.raises(ValueError, match="sample_rate"):
        FeedbackSettings(sample_rate=1.5)
    with pytest.raises(ValueError, match="max_rows"):
        FeedbackSettings(max_rows=0)
