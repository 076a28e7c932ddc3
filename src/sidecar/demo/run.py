"""`sidecar demo`: a model server (the toy iris model, or a real MLServer) with the sidecar in
front, traffic through it, a metrics excerpt, then serving until a signal stops everything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.demo.model import CLASSES, make_model_app, sample_rows, serve_app

_V2_EXAMPLE = (
    '{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP64","data":[5.1,3.5,1.4,0.2]}]}'
)


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


_EXCERPT = ("ml_requests_total", "ml_predictions_total", "ml_prediction_confidence_count")


async def _metrics_excerpt(admin_url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{admin_url}/metrics") as response:
        text = await response.text()
    lines = [line for line in text.splitlines() if line.startswith(_EXCERPT)]
    return "metrics excerpt:\n  " + "\n  ".join(lines)
