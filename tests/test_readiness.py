"""/readyz: what the probe asks each model server (about the model, when its name is known, over
HTTP or the Open Inference Protocol's gRPC), and what the proxy's own traffic says: a refused
connection makes the upstream not ready at once, a reply ready again, without waiting for the
periodic probe (health_interval is 30 s here).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from sidecar.config import Config
from sidecar.oip import oip_pb2
from sidecar.readiness import (
    UNNAMED_MODEL,
    HttpCheck,
    HttpReadiness,
    ReadinessQuestion,
    UpstreamProbe,
    named_model,
    question_for,
)
from tests.conftest import StartSidecar, assert_sample, scrape
from tests.fixtures_util import load

SLOW_PROBES = 30.0  # health_interval: the periodic probe cannot be what notices in these tests


@dataclass
class RestartableUpstream:
    """A model server that can be stopped and started again on the same port. /health answers
    200 while `healthy`, 503 otherwise (a model not loaded); every other path 200."""

    healthy: bool = True
    port: int = 0
    health_checks: int = 0
    health_gate: asyncio.Event = field(default_factory=asyncio.Event)  # /health waits on it
    _runner: web.ServerRunner | None = None

    def __post_init__(self) -> None:
        self.health_gate.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        runner = web.ServerRunner(web.Server(self._handle, access_log=None), shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        if request.path == "/health":
            self.health_checks += 1
            await self.health_gate.wait()
            return web.Response(status=200 if self.healthy else 503)
        return web.Response(text="ok")


@asynccontextmanager
async def restartable_upstream() -> AsyncIterator[RestartableUpstream]:
    server = RestartableUpstream()
    await server.start()
    try:
        yield server
    finally:
        server.health_gate.set()
        await server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[RestartableUpstream]:
    async with restartable_upstream() as server:
        yield server


async def until(condition: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """Wait until `condition` holds, failing the test after `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await condition():
        if loop.time() > deadline:
            pytest.fail(f"{what} within {seconds} s")
        await asyncio.sleep(0.01)


async def readyz(client: aiohttp.ClientSession, admin_url: str) -> tuple[int, str]:
    async with client.get(admin_url + "/readyz") as response:
        body: dict[str, Any] = await response.json()
        return response.status, body["reason"]


async def proxied(client: aiohttp.ClientSession, proxy_url: str) -> int:
    async with client.get(proxy_url + "/predict") as response:
        await response.read()
        return response.status


async def test_a_refused_request_fails_readiness_and_a_reply_restores_it(
    client: aiohttp.ClientSession, upstream: RestartableUpstream, start_sidecar: StartSidecar
) -> None:
    """The upstream stops: the first proxied request gets a 502 and /readyz says 503 by the time
    the client has it, and the gauge is 0. The upstream comes back: the
    first proxied reply makes /readyz 200 and the gauge 1 again."""
    sidecar = await start_sidecar(upstream.url, health_path="/health", health_interval=SLOW_PROBES)
    assert (await readyz(client, sidecar.admin_url))[0] == 200

    await upstream.stop()
    assert await proxied(client, sidecar.proxy_url) == 502
    # The reason is the proxy's, or already that of the probe the failure started.
    status, reason = await readyz(client, sidecar.admin_url)
    assert status == 503
    assert "cannot connect to" in reason.lower()
    assert_sample(await scrape(sidecar), "sidecar_upstream_up", 0)

    await upstream.start()
    assert await proxied(client, sidecar.proxy_url) == 200
    assert await readyz(client, sidecar.admin_url) == (200, f"{upstream.url}/health answered 200")
    assert_sample(await scrape(sidecar), "sidecar_upstream_up", 1)


async def test_a_reply_does_not_overrule_a_health_path_that_says_not_ready(
    client: aiohttp.ClientSession, upstream: RestartableUpstream, start_sidecar: StartSidecar
) -> None:
    """While /health answers 503 (model not loaded), a proxied reply after an outage proves the
    server is up, not that it is ready: /readyz stays 503 with the health path's reason. Once
    /health says 200, the probe, every second while not ready, notices without any traffic."""
    upstream.healthy = False
    sidecar = await start_sidecar(upstream.url, health_path="/health", health_interval=SLOW_PROBES)
    not_loaded = (503, f"{upstream.url}/health answered 503")
    assert await readyz(client, sidecar.admin_url) == not_loaded

    await upstream.stop()
    assert await proxied(client, sidecar.proxy_url) == 502
    assert (await readyz(client, sidecar.admin_url))[0] == 503
    await upstream.start()
    assert await proxied(client, sidecar.proxy_url) == 200
    assert await readyz(client, sidecar.admin_url) == not_loaded

    upstream.healthy = True

    async def ready() -> bool:
        return (await readyz(client, sidecar.admin_url))[0] == 200

    await until(ready, 3.0, "ready")  # a probe comes every second


async def test_failures_during_a_probe_queue_one_more_probe_not_many(
    upstream: RestartableUpstream,
) -> None:
    """Proxy failures while a probe is in flight start no probe of their own: one more runs
    after it (the one in flight may have been answered before the upstream went away), and
    that one's answer makes the upstream ready again."""
    up = Gauge("up", "", registry=CollectorRegistry())
    question = HttpReadiness(HttpCheck(f"{upstream.url}/health"))
    probe = UpstreamProbe(question, interval=SLOW_PROBES, up=up)
    await probe.start()
    try:
        assert probe.status[0]
        upstream.health_gate.clear()  # the next probe hangs until the gate opens
        probe.upstream_failed("connection refused")

        async def probing() -> bool:
            return upstream.health_checks == 2

        await until(probing, 1.0, "the failure started a probe")
        for _ in range(5):
            probe.upstream_failed("connection refused")
        assert probe.status == (False, "proxy traffic: connection refused")
        upstream.health_gate.set()

        async def ready() -> bool:
            return probe.status[0]

        await until(ready, 1.0, "ready")
        assert probe.status == (True, f"{upstream.url}/health answered 200")
        assert upstream.health_checks == 3  # at start, the one in flight, one after it
    finally:
        await probe.stop()


# What readiness asks each model server, and what it makes of the answers.

# (method, path) -> (status, body): JSON to encode, or bytes as they go
Answers = dict[tuple[str, str], tuple[int, Any]]


@dataclass
class ScriptedServer:
    """A model server that answers each (method, path) from `answers`, 404 to anything else,
    and records what it was asked."""

    answers: Answers
    url: str = ""
    asked: list[tuple[str, str]] = field(default_factory=list)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        self.asked.append((request.method, request.path))
        status, body = self.answers.get((request.method, request.path), (404, {"error": "no"}))
        if isinstance(body, bytes):
            return web.Response(body=body, status=status)
        return web.json_response(body, status=status)


@asynccontextmanager
async def scripted(answers: Answers) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(answers)
    runner = web.ServerRunner(web.Server(server.handle, access_log=None), shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        await runner.cleanup()


@asynccontextmanager
async def started(question: ReadinessQuestion) -> AsyncIterator[UpstreamProbe]:
    """A probe of `question`, its first answer in."""
    probe = UpstreamProbe(question, interval=SLOW_PROBES, up=Gauge("up", "", registry=None))
    await probe.start()
    try:
        yield probe
    finally:
        await probe.stop()


HEALTHY = {"status": "Healthy"}
OIP_UP: Answers = {
    ("GET", "/v2/health/ready"): (200, {})
}  # the server is up, whatever its models are


@pytest.mark.parametrize(
    ("settings", "answers", "expected"),
    [
        pytest.param(
            {"preset": "kserve-v1", "model_name": "iris"},
            {("GET", "/v1/models"): (200, {"models": []}), ("GET", "/v1/models/iris"): (404, {})},
            (False, "{url}/v1/models/iris answered 404"),
            id="kserve-v1-model-missing",
        ),
        pytest.param(
            {"preset": "kserve-v1", "model_name": "iris"},
            {("GET", "/v1/models/iris"): (200, {"name": "iris", "ready": False})},
            (False, '{url}/v1/models/iris answered 200 without "ready": true'),
            id="kserve-v1-model-not-ready",
        ),
        pytest.param(
            {"preset": "kserve-v1", "model_names": ["iris"]},
            {("GET", "/v1/models/iris"): (200, {"name": "iris", "ready": True})},
            (True, "{url}/v1/models/iris answered 200"),
            id="kserve-v1-model-ready",
        ),
        pytest.param(
            {"preset": "kserve-v1"},
            {("GET", "/v1/models"): (200, {"models": []})},
            (False, "{url}/v1/models answered 200 without a model in its list"),
            id="kserve-v1-unnamed-empty-list",
        ),
        pytest.param(
            {"preset": "kserve-v1"},
            {("GET", "/v1/models"): (200, {"models": ["iris"]})},
            (True, "{url}/v1/models answered 200"),
            id="kserve-v1-unnamed-listed",
        ),
        pytest.param(
            {"preset": "open-inference-v2", "model_name": "iris"},
            {**OIP_UP, ("GET", "/v2/models/iris/ready"): (400, {"error": "not ready"})},
            (False, "{url}/v2/models/iris/ready answered 400"),
            id="oip-model-not-ready",
        ),
        pytest.param(
            {"preset": "open-inference-v2", "model_name": "iris"},
            {("GET", "/v2/models/iris/ready"): (200, {})},
            (True, "{url}/v2/models/iris/ready answered 200"),
            id="oip-model-ready",
        ),
        pytest.param(
            {"preset": "open-inference-v2", "model_names": ["iris", "wine"]},
            OIP_UP,
            (True, "{url}/v2/health/ready answered 200"),
            id="oip-several-models-asks-the-server",
        ),
        pytest.param(
            {"preset": "torchserve", "model_name": "iris"},
            {("GET", "/ping"): (200, HEALTHY), ("OPTIONS", "/predictions/iris"): (404, {})},
            (False, "OPTIONS {url}/predictions/iris answered 404"),
            id="torchserve-model-not-registered",
        ),
        pytest.param(
            {"preset": "torchserve", "model_name": "iris"},
            {("GET", "/ping"): (200, {"status": "Partial Healthy"})},
            (False, '{url}/ping answered 200 without "status": "Healthy"'),
            id="torchserve-workers-down",
        ),
        pytest.param(
            {"preset": "torchserve", "model_name": "iris"},
            {("GET", "/ping"): (200, HEALTHY), ("OPTIONS", "/predictions/iris"): (200, {})},
            (True, "{url}/ping answered 200; OPTIONS {url}/predictions/iris answered 200"),
            id="torchserve-model-registered",
        ),
        pytest.param(
            {"preset": "openai", "model_name": "llama"},
            {("GET", "/v1/models"): (200, {"object": "list", "data": [{"id": "gpt-4o"}]})},
            (False, "{url}/v1/models answered 200 without the model in its list"),
            id="openai-model-not-served",
        ),
        pytest.param(
            {"preset": "openai", "model_name": "llama"},
            {("GET", "/v1/models"): (200, {"data": [{"id": "gpt-4o"}, {"id": "llama"}]})},
            (True, "{url}/v1/models answered 200"),
            id="openai-model-served",
        ),
        pytest.param(
            {"preset": "mlflow", "model_name": "iris"},
            {("GET", "/ping"): (200, "")},
            (True, "{url}/ping answered 200"),
            id="mlflow-one-model-per-server",
        ),
        pytest.param(
            {"preset": "kserve-v1", "model_name": "iris", "health_path": "/custom"},
            {("GET", "/custom"): (200, {})},
            (True, "{url}/custom answered 200"),
            id="health-path-overrides-the-preset",
        ),
    ],
)
async def test_readiness_asks_for_the_model_when_its_name_is_known(
    settings: dict[str, Any], answers: Answers, expected: tuple[bool, str]
) -> None:
    """With the model's name known, each preset asks about the model, so that a server that is
    up without it is not ready; without a name, about the server (a list of models must not be
    empty). An explicit health_path is asked and nothing else."""
    async with scripted(answers) as server:
        config = Config(upstream=server.url, **settings)
        async with started(question_for(config)) as probe:
            ready, reason = expected
            assert probe.status == (ready, reason.format(url=server.url))
        if "health_path" in settings:
            assert server.asked == [("GET", "/custom")]


@pytest.mark.parametrize(
    ("preset", "server", "model"),
    [
        ("kserve-v1", "kserve", "sklearn-iris"),
        ("kserve-v1", "kserve", None),
        ("open-inference-v2", "kserve", "sklearn-iris"),
        ("open-inference-v2", "mlserver", "iris-sklearn"),
        ("open-inference-v2", "mlserver", None),
        ("mlflow", "mlflow", None),
        ("torchserve", "torchserve", None),  # no OPTIONS was captured: the /ping half only
    ],
)
async def test_real_servers_answers_say_ready(preset: str, server: str, model: str | None) -> None:
    """What each server answered when captured (tests/fixtures), served again: every question
    the preset asks of it, about its model or itself, says ready."""
    answers: Answers = {
        (item.method, item.path): (item.status, item.response.body)
        for item in load(server)
        if item.method == "GET"
    }
    async with scripted(answers) as upstream:
        config = Config(upstream=upstream.url, preset=preset, model_name=model or UNNAMED_MODEL)
        async with started(question_for(config)) as probe:
            assert probe.status[0], probe.status[1]


async def test_a_model_that_loads_turns_readiness_on() -> None:
    """The same probe, asked again once the model has loaded: ready."""
    answers: Answers = {("GET", "/v1/models/iris"): (503, {"error": "loading"})}
    async with scripted(answers) as server:
        config = Config(upstream=server.url, preset="kserve-v1", model_name="iris")
        async with started(question_for(config)) as probe:
            assert not probe.status[0]
            answers[("GET", "/v1/models/iris")] = (200, {"name": "iris", "ready": True})
            await probe.probe()
            assert probe.status == (True, f"{server.url}/v1/models/iris answered 200")


@pytest.mark.parametrize(
    ("model_name", "model_names", "named"),
    [
        ("model", (), None),  # the default: a label, not a name the server knows
        ("iris", (), "iris"),
        ("model", ("iris",), "iris"),
        ("label", ("iris",), "iris"),  # the name on the paths is the server's
        ("iris", ("iris", "wine"), None),  # several: which must be loaded is not ours to say
    ],
)
def test_the_model_readiness_asks_for(
    model_name: str, model_names: tuple[str, ...], named: str | None
) -> None:
    config = Config(upstream="http://127.0.0.1:1", model_name=model_name, model_names=model_names)
    assert named_model(config) == named


@pytest.mark.parametrize(
    ("preset", "model_name"),
    [("kserve-v1", "model"), ("kserve-v1", "iris"), ("open-inference-v2", "iris")],
)
async def test_the_demo_model_is_ready_under_its_presets(
    client: aiohttp.ClientSession,
    toy_model: str,
    start_sidecar: StartSidecar,
    preset: str,
    model_name: str,
) -> None:
    """`sidecar demo-model` answers what readiness asks under both its protocols, with the
    model's name and without (docs/loadtest.md)."""
    sidecar = await start_sidecar(toy_model, preset=preset, model_name=model_name)
    assert (await readyz(client, sidecar.admin_url))[0] == 200


async def test_a_model_the_server_does_not_have_is_not_ready(
    client: aiohttp.ClientSession, toy_model: str, start_sidecar: StartSidecar
) -> None:
    """The demo model serves iris: a sidecar told its model is wine stays not ready, and says
    which question got which answer."""
    sidecar = await start_sidecar(toy_model, preset="kserve-v1", model_name="wine")
    assert await readyz(client, sidecar.admin_url) == (
        503,
        f"{toy_model}/v1/models/wine answered 404",
    )


@dataclass
class OipServer:
    """A gRPC server of the Open Inference Protocol's readiness calls: ServerReady says
    `server_ready`; ModelReady says `models[name]`, or NOT_FOUND for a name it does not have.
    Records the names ModelReady was asked about."""

    server_ready: bool = True
    models: dict[str, bool] = field(default_factory=dict)
    asked: list[tuple[str, str]] = field(default_factory=list)  # (name, version)
    target: str = ""

    async def server_ready_call(
        self, request: oip_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip_pb2.ServerReadyResponse:
        return oip_pb2.ServerReadyResponse(ready=self.server_ready)

    async def model_ready_call(
        self, request: oip_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip_pb2.ModelReadyResponse:
        self.asked.append((request.name, request.version))
        if request.name not in self.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name}")
        return oip_pb2.ModelReadyResponse(ready=self.models[request.name])


@asynccontextmanager
async def oip_server(servicer: OipServer, port: int = 0) -> AsyncIterator[OipServer]:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "ServerReady": grpc.unary_unary_rpc_method_handler(
            servicer.server_ready_call,
            request_deserializer=oip_pb2.ServerReadyRequest.FromString,
            response_serializer=oip_pb2.ServerReadyResponse.SerializeToString,
        ),
        "ModelReady": grpc.unary_unary_rpc_method_handler(
            servicer.model_ready_call,
            request_deserializer=oip_pb2.ModelReadyRequest.FromString,
            response_serializer=oip_pb2.ModelReadyResponse.SerializeToString,
        ),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),)
    )
    servicer.target = f"127.0.0.1:{server.add_insecure_port(f'127.0.0.1:{port}')}"
    await server.start()
    try:
        yield servicer
    finally:
        await server.stop(grace=None)


def grpc_config(target: str, **settings: Any) -> Config:
    """A config whose only way to readiness is gRPC: no preset, no health_path."""
    return Config(upstream="http://127.0.0.1:1", grpc_port=0, grpc_upstream=target, **settings)


async def test_grpc_server_ready_without_a_model_name() -> None:
    """No HTTP health path is known: ServerReady answers for readiness, false as well as true."""
    async with (
        oip_server(OipServer()) as server,
        started(question_for(grpc_config(server.target))) as probe,
    ):
        assert probe.status == (True, f"grpc {server.target} ServerReady answered ready=true")
        server.server_ready = False
        await probe.probe()
        assert probe.status == (False, f"grpc {server.target} ServerReady answered ready=false")
        assert server.asked == []


async def test_grpc_model_ready_asks_for_the_named_model() -> None:
    """With the model's name known, ModelReady is asked about it (no version): its answer is
    readiness, and a model the server does not have is not ready, with the server's words."""
    async with oip_server(OipServer(models={"iris": False})) as server:
        async with started(question_for(grpc_config(server.target, model_name="iris"))) as probe:
            label = f"grpc {server.target} ModelReady iris"
            assert probe.status == (False, f"{label} answered ready=false")
            server.models["iris"] = True
            await probe.probe()
            assert probe.status == (True, f"{label} answered ready=true")
            assert server.asked == [("iris", ""), ("iris", "")]
        async with started(question_for(grpc_config(server.target, model_name="wine"))) as probe:
            label = f"grpc {server.target} ModelReady wine"
            assert probe.status == (False, f"{label}: NOT_FOUND no model wine")


async def test_grpc_readiness_with_nothing_listening_then_a_server() -> None:
    """Nothing listens: unreachable, at once. A server comes up on that port: the next probe
    finds it ready (the channel does not wait out gRPC's long reconnect backoff)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = f"127.0.0.1:{port}"
    async with started(question_for(grpc_config(target))) as probe:
        assert probe.status == (False, f"grpc {target} ServerReady unreachable: UNAVAILABLE")
        await probe.probe()  # a second failure: the channel's backoff grows
        async with oip_server(OipServer(), port):

            async def ready() -> bool:
                await probe.probe()
                return probe.status[0]

            await until(ready, 3.0, "ready once the server listens")


async def test_a_preset_is_asked_over_http_even_with_grpc_upstream() -> None:
    """grpc_upstream alone does not move readiness to gRPC when an HTTP question is known."""
    async with scripted({("GET", "/v2/health/ready"): (200, {})}) as server:
        config = Config(
            upstream=server.url,
            preset="open-inference-v2",
            grpc_port=0,
            grpc_upstream="127.0.0.1:1",
        )
        async with started(question_for(config)) as probe:
            assert probe.status == (True, f"{server.url}/v2/health/ready answered 200")
