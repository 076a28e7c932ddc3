"""A tiny bundled model server: the toy iris model, over HTTP.

The model is a nearest-centroid iris classifier (class means of the iris data set, softmax over
negative squared distances). It speaks KServe V1 and the Open Inference Protocol (V2), so the
`kserve-v1` and `open-inference-v2` presets both work against it with no install at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import numpy as np
from aiohttp import web

CLASSES = ("setosa", "versicolor", "virginica")
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
_CENTROIDS = np.array(
    [[5.006, 3.428, 1.462, 0.246], [5.936, 2.770, 4.260, 1.326], [6.588, 2.974, 5.552, 2.026]]
)
_SPREAD = np.array([0.35, 0.38, 0.17, 0.10, 0.52, 0.31, 0.47, 0.20, 0.64, 0.32, 0.55, 0.27])


def predict_proba(rows: np.ndarray) -> np.ndarray:
    """Class probabilities per row: softmax of minus the squared distance to each centroid."""
    distances = ((rows[:, None, :] - _CENTROIDS[None, :, :]) ** 2).sum(axis=2)
    logits = -distances / 0.5
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return np.asarray(weights / weights.sum(axis=1, keepdims=True))


def sample_rows(rng: random.Random, count: int, shift: float = 0.0) -> list[list[float]]:
    """Iris-like rows: a random class centroid plus per-feature noise (shift moves sepal_length)."""
    rows = []
    for _ in range(count):
        label = rng.randrange(3)
        spread = _SPREAD[label * 4 : label * 4 + 4]
        row = [round(rng.gauss(c, s), 2) for c, s in zip(_CENTROIDS[label], spread, strict=True)]
        row[0] = round(row[0] + shift, 2)
        rows.append(row)
    return rows


def make_model_app(name: str = "iris") -> web.Application:
    """The toy model server: KServe V1 (`/v1/models/{name}:predict`) and V2 (`/v2/...`)."""

    async def v1_predict(request: web.Request) -> web.Response:
        try:
            payload = await request.json()
            rows = np.asarray(payload.get("instances", payload.get("inputs")), dtype=float)
            probabilities = predict_proba(rows.reshape(-1, 4))
        except (ValueError, TypeError, AttributeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        return web.json_response({"predictions": probabilities.round(6).tolist()})

    async def v2_infer(request: web.Request) -> web.Response:
        try:
            payload = await request.json()
            tensor = payload["inputs"][0]
            rows = np.asarray(tensor["data"], dtype=float).reshape(tensor["shape"])
            probabilities = predict_proba(rows.reshape(-1, 4))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        output = {
            "name": "predict_proba",
            "shape": list(probabilities.shape),
            "datatype": "FP64",
            "data": probabilities.round(6).ravel().tolist(),
        }
        body = {"model_name": name, "id": payload.get("id", ""), "outputs": [output]}
        return web.json_response(body)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def model_status(request: web.Request) -> web.Response:
        return web.json_response({"name": name, "ready": True})

    async def model_list(request: web.Request) -> web.Response:
        return web.json_response({"models": [name]})

    app = web.Application(client_max_size=64 * 1024 * 1024)  # big batches are part of the demo
    app.router.add_post(f"/v1/models/{name}:predict", v1_predict)
    # What readiness asks of each protocol (sidecar.readiness), with and without the model's name.
    app.router.add_get("/v1/models", model_list)
    app.router.add_get(f"/v1/models/{name}", model_status)
    app.router.add_post(f"/v2/models/{name}/infer", v2_infer)
    app.router.add_get(f"/v2/models/{name}/ready", ready)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/health/live", ready)
    return app


@contextlib.asynccontextmanager
async def serve_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Run an aiohttp app (port 0: any free one); yield its base URL, clean up on exit."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        yield f"http://{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def serve_model(host: str, port: int) -> None:
    """Run the toy model server until cancelled."""
    async with serve_app(make_model_app(), host, port):
        await asyncio.Event().wait()
