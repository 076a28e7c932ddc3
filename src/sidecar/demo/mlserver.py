"""A real MLServer for the demo and the integration test: train, configure, start, wait, stop.

MLServer and scikit-learn live in their own virtualenv (scripts/install-mlserver); this module only
drives that venv's executables, so the sidecar's venv never needs scikit-learn. HTTP here uses the
standard library in a thread: the readiness poll and the demo traffic are a few hundred requests,
and keeping aiohttp out leaves this module outside the proxy's import rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from sidecar.children import die_with_parent, stop_group

__all__ = [
    "MODEL_NAME",
    "MODEL_VERSION",
    "MLServer",
    "MLServerError",
    "iris_rows",
    "run_mlserver",
    "send_v2_traffic",
    "v2_body",
]

MODEL_NAME: Final = "iris"
MODEL_VERSION: Final = "v1"

# Run by the MLServer venv's python: the same model as every fixture in tests/fixtures.
_TRAIN = """\
import sys
import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

features, labels = load_iris(return_X_y=True)
joblib.dump(LogisticRegression(max_iter=1000).fit(features, labels), sys.argv[1])
"""

# Per-class mean and standard deviation of the iris features (sepal l/w, petal l/w), to make
# rows that land in every class without shipping the data set.
_IRIS_CLASSES: Final = (
    ((5.006, 3.428, 1.462, 0.246), (0.352, 0.379, 0.174, 0.105)),
    ((5.936, 2.770, 4.260, 1.326), (0.516, 0.314, 0.470, 0.198)),
    ((6.588, 2.974, 5.552, 2.026), (0.636, 0.322, 0.552, 0.275)),
)
_LOG_TAIL_LINES: Final = 40
_BIND_RETRIES: Final = 3


class MLServerError(RuntimeError):
    """MLServer could not be prepared or started, or it answered traffic with an error."""


@dataclass(frozen=True)
class MLServer:
    """A running MLServer: its HTTP base URL, the model it serves, and where it logs."""

    url: str
    model_name: str
    model_version: str
    log_path: Path
    pid: int
    grpc_address: str  # host:port of its gRPC (Open Inference Protocol) port

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.model_name}/infer"


@contextlib.asynccontextmanager
async def run_mlserver(
    mlserver_bin: Path, workdir: Path, *, ready_timeout: float = 120.0
) -> AsyncIterator[MLServer]:
    """Train the iris model, start `mlserver start` on free loopback ports, yield once ready.

    `mlserver_bin` is the `mlserver` script of a venv that also holds mlserver-sklearn and
    scikit-learn (scripts/install-mlserver makes one). Everything is written under `workdir`:
    `models/` (settings and model.joblib), `mlserver.log`. On exit, cancellation included,
    the whole process group is terminated (MLServer may fork workers), then killed if it
    lingers; if this process dies without a chance to clean up, Linux sends MLServer and the
    training run SIGTERM (sidecar.children).

        async with run_mlserver(Path(".venv-mlserver/bin/mlserver"), tmp) as server:
            print(server.url)  # http://127.0.0.1:PORT, model "iris", version "v1"
    """
    mlserver_bin, models = await asyncio.to_thread(_prepare, mlserver_bin, workdir)
    await _train(mlserver_bin.parent / "python", models / MODEL_NAME / "model.joblib")
    log_path = models.parent / "mlserver.log"
    process, url, grpc_address = await _start(mlserver_bin, models, log_path, ready_timeout)
    try:
        yield MLServer(url, MODEL_NAME, MODEL_VERSION, log_path, process.pid, grpc_address)
    finally:
        await stop_group(process)


def iris_rows(rng: random.Random, count: int) -> list[list[float]]:
    """`count` iris-like rows (4 features, one decimal), each from a randomly chosen class."""
    rows = []
    for _ in range(count):
        means, spreads = _IRIS_CLASSES[rng.randrange(len(_IRIS_CLASSES))]
        row = [round(max(0.1, rng.gauss(m, s)), 1) for m, s in zip(means, spreads, strict=True)]
        rows.append(row)
    return rows


def v2_body(rows: Sequence[Sequence[float]], request_id: str) -> bytes:
    """An Open Inference Protocol request asking for both `predict` and `predict_proba`.

    The same shape as the fixture `infer_both_outputs`: one FP64 input of shape [n, 4], data
    flattened row-major, and an `id` so the response is deterministic (MLServer echoes it).
    """
    body = {
        "id": request_id,
        "inputs": [
            {
                "name": "input-0",
                "shape": [len(rows), len(rows[0]) if rows else 4],
                "datatype": "FP64",
                "data": [value for row in rows for value in row],
            }
        ],
        "outputs": [{"name": "predict"}, {"name": "predict_proba"}],
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def send_v2_traffic(
    base_url: str,
    requests: int,
    rows_per_request: int | Sequence[int],
    seed: int = 0,
    *,
    model: str = MODEL_NAME,
    version: str | None = None,
) -> list[dict[str, Any]]:
    """POST `requests` V2 inference requests to `base_url`; return the parsed responses in order.

    `rows_per_request` is one batch size, or a sequence of sizes used in turn. With `version`
    the versioned path `/v2/models/{model}/versions/{version}/infer` is used. Requests go one at
    a time over one keep-alive connection, in a worker thread so the event loop (and a sidecar
    running on it) stays free. Any status but 200 raises MLServerError with the body.
    """
    sizes = [rows_per_request] if isinstance(rows_per_request, int) else list(rows_per_request)
    if not sizes or min(sizes) < 1:
        msg = f"rows_per_request must be positive, got {rows_per_request!r}"
        raise ValueError(msg)
    rng = random.Random(seed)
    bodies = [
        v2_body(iris_rows(rng, sizes[index % len(sizes)]), f"req-{seed}-{index}")
        for index in range(requests)
    ]
    suffix = f"/versions/{version}" if version is not None else ""
    path = f"/v2/models/{model}{suffix}/infer"
    return await asyncio.to_thread(_post_all, base_url, path, bodies)


def _post_all(base_url: str, path: str, bodies: list[bytes]) -> list[dict[str, Any]]:
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/") + path
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    responses = []
    try:
        for body in bodies:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                where = f"{parts.scheme}://{parts.netloc}{path}"
                msg = f"POST {where} answered {response.status}: {data[:500]!r}"
                raise MLServerError(msg)
            responses.append(json.loads(data))
    finally:
        connection.close()
    return responses


def _prepare(mlserver_bin: Path, workdir: Path) -> tuple[Path, Path]:
    """The absolute mlserver path and a fresh model repository with the model's settings."""
    # Absolute, but not resolved: the venv's python is a symlink and must stay the venv's.
    mlserver_bin = Path(os.path.abspath(mlserver_bin))
    python = mlserver_bin.parent / "python"
    if not python.exists():
        msg = f"no python beside {mlserver_bin} (scripts/install-mlserver makes that venv)"
        raise MLServerError(msg)
    models = Path(os.path.abspath(workdir)) / "models"
    (models / MODEL_NAME).mkdir(parents=True, exist_ok=True)
    # No outputs are declared: mlserver-sklearn returns whichever of predict / predict_proba
    # the request names in `outputs` (both at once if asked), and `predict` when none is named.
    model_settings = {
        "name": MODEL_NAME,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": MODEL_VERSION},
    }
    (models / MODEL_NAME / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return mlserver_bin, models


def _write_settings(models: Path, http_port: int, grpc_port: int) -> None:
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        # gRPC cannot be switched off in MLServer 1.7, so it gets a free port of its own.
        "grpc_port": grpc_port,
        # MLServer's own /metrics server is off: the sidecar exports the metrics here.
        "metrics_endpoint": None,
        # 0 keeps inference in the server process: no worker pool to fork, on 2 shared cores.
        "parallel_workers": 0,
        "debug": False,
    }
    (models / "settings.json").write_text(json.dumps(settings, indent=2))


async def _train(python: Path, model_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        str(python),
        "-c",
        _TRAIN,
        str(model_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # A session of its own, as MLServer's: a terminal's Ctrl-C reaches only us and we stop
        # the child, which could otherwise die first and be reported as a failed training.
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    try:
        output, _ = await process.communicate()
    except BaseException:  # cancelled (the demo got SIGTERM or Ctrl-C): training must stop too
        await stop_group(process)
        raise
    if process.returncode != 0:
        tail = output.decode(errors="replace")[-2000:]
        msg = f"training the iris model with {python} failed ({process.returncode}):\n{tail}"
        raise MLServerError(msg)


def _free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out. MLServer must be given numbers (it cannot take 0), so
    another process may still grab one before MLServer binds it: _wait_ready notices that and
    run_mlserver starts again on fresh ports."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


async def _spawn(mlserver_bin: Path, models: Path, log_path: Path) -> asyncio.subprocess.Process:
    # MLSERVER_* variables override settings.json; the ones chosen here must win.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER_")}
    # A fresh log per attempt, so an earlier attempt's bind error is not read as this one's.
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(
            str(mlserver_bin),
            "start",
            str(models),
            cwd=models.parent,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Its own process group, so stop_group reaches any child MLServer starts.
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )


class _PortTaken(Exception):
    """MLServer exited because one of its ports was bound by someone else first."""


async def _start(
    mlserver_bin: Path, models: Path, log_path: Path, ready_timeout: float
) -> tuple[asyncio.subprocess.Process, str, str]:
    """Start MLServer on fresh ports until one attempt gets both; return it once ready, with
    its HTTP URL and gRPC address."""
    for _ in range(_BIND_RETRIES):
        http_port, grpc_port = _free_ports(2)
        await asyncio.to_thread(_write_settings, models, http_port, grpc_port)
        process = await _spawn(mlserver_bin, models, log_path)
        url = f"http://127.0.0.1:{http_port}"
        try:
            async with asyncio.timeout(ready_timeout):
                await _wait_ready(process, url, log_path)
        except _PortTaken:
            await stop_group(process)
            continue
        except TimeoutError:
            await stop_group(process)
            reason = f"MLServer at {url} was not ready within {ready_timeout:.0f} s"
            raise MLServerError(await _failure(reason, log_path)) from None
        except BaseException:
            await stop_group(process)
            raise
        return process, url, f"127.0.0.1:{grpc_port}"
    reason = f"MLServer lost a port to another process {_BIND_RETRIES} times in a row"
    raise MLServerError(await _failure(reason, log_path))


async def _wait_ready(process: asyncio.subprocess.Process, url: str, log_path: Path) -> None:
    """Poll the server and model ready endpoints until both answer 200 or MLServer exits."""
    probes = ("/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready")
    while True:
        if process.returncode is not None:
            if "address already in use" in (await _log_text(log_path)).lower():
                raise _PortTaken
            reason = f"MLServer exited with code {process.returncode} before it was ready"
            raise MLServerError(await _failure(reason, log_path))
        statuses = [await asyncio.to_thread(_get_status, url + probe) for probe in probes]
        if statuses == [200, 200]:
            return
        await asyncio.sleep(0.2)


def _get_status(url: str) -> int | None:
    """The status of GET url, or None when nothing answers."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=5)
    try:
        connection.request("GET", parts.path)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


async def _log_text(path: Path) -> str:
    def read() -> str:
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    return await asyncio.to_thread(read)


async def _failure(reason: str, log_path: Path) -> str:
    log = await _log_text(log_path)
    tail = "\n".join(log.splitlines()[-_LOG_TAIL_LINES:])
    return f"{reason}; last lines of {log_path}:\n{tail}"
