"""A tiny bundled model server and a demo run: the toy iris model, the sidecar in front, traffic.

The model is a nearest-centroid iris classifier (class means of the iris data set, softmax over
negative squared distances). It speaks KServe V1 and the Open Inference Protocol (V2), so the
`kserve-v1` and `open-inference-v2` presets both work against it with no install at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
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

    app = web.Application(client_max_size=64 * 1024 * 1024)  # big batches are part of the demo
    app.router.add_post(f"/v1/models/{name}:predict", v1_predict)
    app.router.add_get(f"/v1/models/{name}", model_status)
    app.router.add_post(f"/v2/models/{name}/infer", v2_infer)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/health/live", ready)
    return app


async def send_traffic(
    base_url: str, requests: int, *, batch: int = 4, seed: int = 0, shift: float = 0.0
) -> dict[int, int]:
    """POST `requests` KServe V1 predictions of `batch` rows each; return status code counts."""
    rng = random.Random(seed)
    codes: dict[int, int] = {}
    async with aiohttp.ClientSession() as session:
        for _ in range(requests):
            body: dict[str, Any] = {"instances": sample_rows(rng, batch, shift)}
            async with session.post(
                f"{base_url}/v1/models/iris:predict",
                data=json.dumps(body),
                headers={"Content-Type": "application/json"},
            ) as response:
                await response.read()
                codes[response.status] = codes.get(response.status, 0) + 1
    return codes


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


async def until_signalled(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` until it returns, or until SIGTERM or SIGINT cancels it.

    Cancelling unwinds every `async with` in `main`: the sidecar drains and MLServer's process
    group is stopped (sidecar.demo.mlserver), so nothing the demo started outlives it. After a
    signal this returns normally and the command exits 0, as `sidecar serve` does: being
    stopped is how a demo ends, and 128 + signal would tell a shell it died unhandled.
    """
    task = asyncio.create_task(main)
    signalled = False

    def stop() -> None:
        nonlocal signalled
        # Once only: a second Ctrl-C must not cancel the clean-up the first one started, which
        # is bounded anyway (children get SIGKILL when SIGTERM is not enough).
        if not signalled:
            signalled = True
            task.cancel()

    loop = asyncio.get_running_loop()
    for signum in (
        signal.SIGTERM,  # `kill <pid>`, and service managers stopping us
        signal.SIGINT,  # Ctrl-C in a terminal
    ):
        loop.add_signal_handler(signum, stop)
    try:
        await task
    except asyncio.CancelledError:
        if not signalled:  # cancelled from outside: not ours to swallow
            raise


async def run_demo(
    *, port: int, metrics_port: int, requests: int, once: bool, mlserver: Path | None
) -> None:
    """A model server, the sidecar in front of it on `port`, traffic, a metrics excerpt.

    With `mlserver` (the `mlserver` script of a venv that has mlserver-sklearn), a real MLServer
    serves a scikit-learn iris model over the Open Inference Protocol; otherwise the toy model
    answers KServe V1 requests.
    """
    from sidecar.app import Sidecar  # the demo sits above the app; the app never imports it
    from sidecar.config import Config
    from sidecar.extract.spec import MappingSpec

    async with contextlib.AsyncExitStack() as stack:
        if mlserver is not None:
            from sidecar.demo.mlserver import run_mlserver, send_v2_traffic

            print("starting MLServer (trains the iris model first) ...", flush=True)
            server = await stack.enter_async_context(run_mlserver(mlserver, Path(".demo/mlserver")))
            upstream, preset, what = server.url, "open-inference-v2", "MLServer iris (V2)"
        else:
            upstream = await stack.enter_async_context(serve_app(make_model_app()))
            preset, what = "kserve-v1", "toy iris model (KServe V1, V2)"
        config = Config(
            upstream=upstream,
            host="127.0.0.1",
            port=port,
            metrics_port=metrics_port,
            preset=preset,
            mapping=MappingSpec(class_names=CLASSES),
            model_name="iris",
            health_interval=2.0,
            # No load balancer to tell: Ctrl-C closes the ports at once.
            shutdown_delay=0.0,
        )
        sidecar = Sidecar(config)
        await sidecar.start()
        stack.push_async_callback(sidecar.stop)
        print(f"model server     {upstream}  ({what})")
        print(f"sidecar proxy    {sidecar.proxy_url}  -> the model server")
        print(f"sidecar metrics  {sidecar.admin_url}/metrics  (/healthz, /readyz)")
        if mlserver is not None:
            await send_v2_traffic(sidecar.proxy_url, requests, rows_per_request=(1, 4, 8))
            example = "/v2/models/iris/infer"
            body = _V2_EXAMPLE
        else:
            await send_traffic(sidecar.proxy_url, requests)
            example = "/v1/models/iris:predict"
            body = '{"instances":[[5.1,3.5,1.4,0.2]]}'
        print(f"\nsent {requests} prediction requests through the sidecar\n")
        print(await _metrics_excerpt(sidecar.admin_url))
        if not once:
            print("\nserving; try:")
            json_header = "-H 'Content-Type: application/json'"
            print(f"  curl -s {sidecar.proxy_url}{example} {json_header} -d '{body}'")
            print(f"  curl -s {sidecar.admin_url}/metrics | grep ^ml_")
            print("Ctrl-C to stop.", flush=True)
            await asyncio.Event().wait()


_V2_EXAMPLE = (
    '{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP64","data":[5.1,3.5,1.4,0.2]}]}'
)


_EXCERPT = ("ml_requests_total", "ml_predictions_total", "ml_prediction_confidence_count")


async def _metrics_excerpt(admin_url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{admin_url}/metrics") as response:
        text = await response.text()
    lines = [line for line in text.splitlines() if line.startswith(_EXCERPT)]
    return "metrics excerpt:\n  " + "\n  ".join(lines)
