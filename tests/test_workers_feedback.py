"""Ground truth with `--workers`: every worker writes its rows into the one store (a SQLite file
in WAL mode, or a PostgreSQL table), and labels posted to the supervisor's admin port find the
rows of every worker; the label counters and the windows are exact."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import yaml

from sidecar.demo.model import CLASSES
from tests.test_feedback import iris_rows
from tests.test_workers import Running, _metric_sum, _owners, supervisor

pytestmark = pytest.mark.timeout(180)

ROWS = 300
BATCH = 3
WINDOW = "20000_rows"


def write_config(path: Path, store: str) -> Path:
    settings = {
        "preset": "kserve-v1",
        "model_name": "iris",
        "mapping": {"class_names": list(CLASSES)},
        "feedback": {"store": store, "refresh_seconds": 0.05, "window_rows": [20_000]},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


async def predict_all(
    session: aiohttp.ClientSession, running: Running, rows: list[list[float]]
) -> list[tuple[str, int, str]]:
    """POST the rows in batches over many connections, so that both workers take some; each
    request names its id. Returns (request id, row, predicted class) per row."""
    gate = asyncio.Semaphore(16)

    async def one(start: int) -> list[tuple[str, int, str]]:
        request_id = f"w-{start}"
        body = {"instances": rows[start : start + BATCH]}
        url = f"{running.proxy}/v1/models/iris:predict"
        headers = {"X-Request-ID": request_id}
        async with gate, session.post(url, json=body, headers=headers) as response:
            predictions = (await response.json())["predictions"]
        # The toy model answers class probabilities: the predicted class is the likeliest.
        return [
            (request_id, row, CLASSES[int(np.argmax(probabilities))])
            for row, probabilities in enumerate(predictions)
        ]

    batches = await asyncio.gather(*(one(start) for start in range(0, len(rows), BATCH)))
    return [prediction for batch in batches for prediction in batch]


def true_class(truth: list[int], request_id: str, row: int) -> str:
    """The true class of a row: request `w-N` carried rows N, N+1, ... of the data."""
    return CLASSES[truth[int(request_id.removeprefix("w-")) + row]]


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.04)
    pytest.fail("the metrics never got there")


async def labels_are_joined_across_workers(toy_model: str, config: Path) -> None:
    rows, truth = iris_rows(ROWS, seed=21)
    async with (
        supervisor(toy_model, "--config", str(config)) as running,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session,
    ):
        predictions = await predict_all(session, running, rows)
        assert len(set(_owners(running.port, running.workers()).values())) == 2

        async def written() -> bool:
            name = "sidecar_prediction_log_written_total"
            return await _metric_sum(session, running.metrics, name) == ROWS

        await until(written)
        items = [
            {"request_id": request_id, "row": row, "label": true_class(truth, request_id, row)}
            for request_id, row, _ in predictions
        ]
        random.Random(3).shuffle(items)
        admin = running.metrics.removesuffix("/metrics")
        async with session.post(f"{admin}/feedback", json=items) as response:
            assert response.status == 200
            answer = await response.json()
        assert (answer["matched"], answer["unmatched"]) == (ROWS, 0)

        right = sum(
            predicted == true_class(truth, request_id, row)
            for request_id, row, predicted in predictions
        )

        async def windowed() -> bool:
            rows_in_window = await _metric_sum(
                session, running.metrics, "ml_labelled_rows", window=WINDOW
            )
            return rows_in_window == ROWS

        await until(windowed)
        metrics = running.metrics
        assert await _metric_sum(session, metrics, "ml_labelled_total") == ROWS
        assert await _metric_sum(session, metrics, "ml_labelled_total", correct="true") == right
        accuracy = await _metric_sum(session, metrics, "ml_accuracy", window=WINDOW)
        assert accuracy == pytest.approx(right / ROWS)


async def test_sqlite_store_is_shared_by_the_workers(toy_model: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "sidecar.yaml", str(tmp_path / "predictions.db"))
    await labels_are_joined_across_workers(toy_model, config)


async def test_postgres_store_is_shared_by_the_workers(
    toy_model: str, postgres_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "sidecar.yaml", postgres_url)
    await labels_are_joined_across_workers(toy_model, config)
