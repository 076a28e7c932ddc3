"""Shared fixtures: a scripted upstream on an ephemeral port, the sidecar in process, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Sidecar
from sidecar.config import Config
from sidecar.demo.mlserver import MLServer, run_mlserver
from sidecar.demo.model import make_model_app, serve_app
from tests.bare_response import BareResponse
from tests.postgres import PostgresCluster, running_cluster

BIG = 20 * 1024 * 1024


def payload_bytes(size: int) -> bytes:
    """Deterministic incompressible-looking bytes of any size (every byte value appears)."""
    block = hashlib.sha256(b"sidecar").digest() * 2048 + bytes(range(256))
    return (block * (size // len(block) + 1))[:size]


@dataclass
class CannedUpstream:
    """A real HTTP server with scripted answers. `seen` holds every request it received, once
    read whole; `arrived[path]` is set as soon as the head of a request for `path` is here."""

    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    sse_release: asyncio.Event = field(default_factory=asyncio.Event)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    slow_abandoned: asyncio.Event = field(default_factory=asyncio.Event)
    healthy: bool = True
    connections: set[tuple[str, int]] = field(default_factory=set)
    stream_abandoned: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: defaultdict[str, asyncio.Event] = field(
        default_factory=lambda: defaultdict(asyncio.Event)
    )

    async def head_of(self, path: str) -> None:
        """Return once a request for `path` has reached this upstream, its body still to come
        (bounded: a test fails rather than hangs)."""
        await asyncio.wait_for(self.arrived[path].wait(), timeout=10)


async def _canned_handler(upstream: CannedUpstream, request: web.BaseRequest) -> web.StreamResponse:
    upstream.arrived[request.path].set()
    body = await request.content.read()  # no size cap: this upstream takes 20 MB bodies
    upstream.seen.append(
        {
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": list(request.headers.items()),
            "body": body,
        }
    )
    path = request.path
    if request.transport is not None:
        upstream.connections.add(request.transport.get_extra_info("peername"))
    if path == "/health":
        return web.Response(status=200 if upstream.healthy else 503, text="ok")
    if path.startswith("/echo"):
        return web.Response(
            body=body, headers={"Content-Type": "application/octet-stream", "X-Echo": "1"}
        )
    if path.startswith("/bytes/"):
        return web.Response(
            body=payload_bytes(int(path.rsplit("/", 1)[1])), content_type="application/octet-stream"
        )
    if path == "/json":
        return web.json_response({"predictions": [[0.1, 0.9]]}, headers={"Set-Cookie": "a=1"})
    if path == "/no-content-type":
        # Like TorchServe. aiohttp's own responses always add a Content-Type; this one does not.
        bare = BareResponse(headers={"Content-Length": "20"})
        await bare.prepare(request)
        await bare.write(b'{\n  "setosa": 0.98\n}')
        await bare.write_eof()
        return bare
    if path == "/chunked":
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for index in range(5):
            await response.write(f"chunk {index}\n".encode())
        await response.write_eof()
        return response
    if path == "/sse":
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        # The test releases the rest only after it has seen the first event through the proxy.
        await upstream.sse_release.wait()
        for index in range(3):
            await response.write(f"data: event {index}\n\n".encode())
        await response.write_eof()
        return response
    if path == "/sse-forever":
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        # Then silence: only the proxy hanging up ends this request.
        for _ in range(1000):
            if request.transport is None or request.transport.is_closing():
                upstream.stream_abandoned.set()
                break
            await asyncio.sleep(0.01)
        return response
    if path == "/gzip":
        return web.Response(
            body=gzip.compress(b'{"compressed": true}' * 50),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
    if path.startswith("/status/"):
        return web.Response(status=int(path.rsplit("/", 1)[1]))
    if path == "/slow":
        upstream.slow_started.set()
        for _ in range(500):  # about 5 s, unless the proxy hangs up first
            if request.transport is None or request.transport.is_closing():
                upstream.slow_abandoned.set()
                break
            await asyncio.sleep(0.01)
        return web.Response(text="late")
    if path == "/reset":
        response = web.StreamResponse(
            headers={"Content-Length": "100000", "Content-Type": "text/plain"}
        )
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return response
    if path == "/close-after":
        # Answers as keep-alive, then hangs up: a pooled connection the upstream closed.
        response = web.Response(text="bye")
        await response.prepare(request)
        await response.write_eof()
        assert request.transport is not None
        request.transport.close()
        return response
    if path == "/error":
        return web.Response(status=500, text="Internal Server Error")
    return web.Response(status=404, text="no such path")


@pytest.fixture
async def canned_upstream() -> AsyncIterator[CannedUpstream]:
    upstream = CannedUpstream()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return await _canned_handler(upstream, request)

    runner = web.ServerRunner(web.Server(handler, access_log=None), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield upstream
    upstream.sse_release.set()
    await runner.cleanup()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on uvloop, as `sidecar serve` does."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def toy_model() -> AsyncIterator[str]:
    """The bundled toy iris model (KServe V1 and V2) on an ephemeral port."""
    async with serve_app(make_model_app()) as url:
        yield url


StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start_sidecar() -> AsyncIterator[StartSidecar]:
    """Start sidecars on ephemeral ports with a fresh registry each; all are stopped at the end."""
    started: list[Sidecar] = []

    async def start(upstream: str, **settings: Any) -> Sidecar:
        settings.setdefault("drain_timeout", 1.0)
        settings.setdefault("shutdown_delay", 0.0)  # no load balancer to wait for
        config = Config(upstream=upstream, host="127.0.0.1", port=0, metrics_port=0, **settings)
        sidecar = Sidecar(config, registry=CollectorRegistry())
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        await sidecar.stop()


@pytest.fixture
async def sidecar(canned_upstream: CannedUpstream, start_sidecar: StartSidecar) -> Sidecar:
    return await start_sidecar(canned_upstream.url, health_path="/health")


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that shows bodies exactly as sent: no decompression, no cookies kept."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


async def scrape(sidecar: Sidecar) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sidecar.admin_url}/metrics") as response,
    ):
        return await response.text()


async def scrape_until(sidecar: Sidecar, check: Callable[[str], bool]) -> str:
    """Scrape until `check` holds: payloads are recorded, rows written and gauges refreshed
    after the reply. Bounded (about 20 s): the last scrape is returned either way and the
    caller's assertions say what is missing."""
    text = ""
    for _ in range(1000):
        text = await scrape(sidecar)
        if check(text):
            break
        await asyncio.sleep(0.02)
    return text


async def settled(sidecar: Sidecar, name: str, expected: float, **labels: str) -> str:
    """Scrape until one sample reaches its expected value, and return that scrape. Fails (after
    about 20 s) showing what the last scrape held of the metric, if it never does."""
    text = await scrape_until(sidecar, lambda text: sample(text, name, **labels) == expected)
    assert_sample(text, name, expected, **labels)
    return text


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in exposition text, or None when no sample has these labels."""
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            if metric.name == name and all(metric.labels.get(k) == v for k, v in labels.items()):
                return float(metric.value)
    return None


def assert_sample(text: str, name: str, expected: float | None, **labels: str) -> None:
    """Assert that one sample has the expected value (None: that there is no such sample). On
    failure the message lists the samples of `name` the scrape did hold, so that a renamed label
    value or a count off by one shows at once."""
    found = sample(text, name, **labels)
    if found == expected:
        return
    selector = f"{name}{{{_labels_text(labels)}}}"
    held = [
        f"  {metric.name}{{{_labels_text(metric.labels)}}} {metric.value}"
        for family in text_string_to_metric_families(text)
        for metric in family.samples
        if metric.name == name
    ]
    scrape_held = "\n".join(held) if held else f"  no {name} sample at all"
    msg = f"{selector} is {found}, expected {expected}; the scrape held:\n{scrape_held}"
    raise AssertionError(msg)


def _labels_text(labels: dict[str, str]) -> str:
    return ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """An upstream URL where connections are refused: its port is bound here and never listened
    on, so nothing else can take it while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A port for `sidecar serve --workers N`, which cannot take port 0 (each worker would get a
    port of its own). The port is held here, bound with SO_REUSEPORT and not listening, until the
    block ends: the workers (which set SO_REUSEPORT too) can bind it, nothing else can, and no
    connection comes to this socket."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def free_port() -> int:
    """A port nothing listens on now, for a process that takes only a port number (Prometheus).
    Another process may take it before that one binds it: the caller retries. A sidecar takes
    port 0 and logs where it listens (`ServeProcess`); an unreachable upstream is
    `refusing_url`, a port for workers `reserved_port()`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


LOG_DEADLINE = 30.0  # seconds a child process gets to log what a test waits for, or to exit


@dataclass
class ServeProcess:
    """`python -m sidecar serve` as a child process. Its stderr (JSON lines) is read as it comes
    into `lines`, so that the pipe never fills, and tests can wait for a line."""

    process: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ended: bool = False
    _reader: asyncio.Task[None] = field(init=False)

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> ServeProcess:
        """Start `python -m sidecar serve ARGS`. Give it `--port 0 --metrics-port 0` and read
        the ports it bound from its "serving" line: `await served.ports()`."""
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "sidecar", "serve", *args),
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        served = cls(process)
        served._reader = asyncio.create_task(served._read())
        return served

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            try:
                line = json.loads(text)
            except ValueError:
                line = None
            if not isinstance(line, dict):  # a traceback, a warning: kept, without a msg
                line = {"msg": None, "text": text}
            print(text, file=sys.stderr)  # pytest shows it when the test fails
            async with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        async with self._changed:
            self._ended = True
            self._changed.notify_all()

    async def logged(self, message: str) -> dict[str, Any]:
        """The first line logged with this `msg`, once there is one. Fails, showing what the
        process logged, if it exits first or LOG_DEADLINE passes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LOG_DEADLINE), self._changed:
                while not self._ended:
                    for line in self.lines:
                        if line.get("msg") == message:
                            return line
                    await self._changed.wait()
        for line in self.lines:  # it may have come with the end
            if line.get("msg") == message:
                return line
        logged = "\n".join(json.dumps(line) for line in self.lines[-20:])
        pytest.fail(f"no {message!r} in the log (exit code {self.process.returncode}):\n{logged}")

    async def port(self, message: str, key: str) -> int:
        """The port of the URL under `key` in the first `message` line, such as the admin port
        in a supervisor's "supervising"."""
        url = str((await self.logged(message))[key])
        return int(url.rsplit(":", 1)[1])

    async def ports(self) -> tuple[int, int]:
        """The proxy and admin ports, from the "serving" line (logged once both listen)."""
        return await self.port("serving", "proxy"), await self.port("serving", "admin")

    async def exited(self) -> tuple[int, list[dict[str, Any]]]:
        """Wait (up to LOG_DEADLINE) for the exit: (exit code, every line it logged)."""
        async with asyncio.timeout(LOG_DEADLINE):
            code = await self.process.wait()
            await self._reader
        return code, self.lines


StartServe = Callable[..., Awaitable[ServeProcess]]


@pytest.fixture
async def serve() -> AsyncIterator[StartServe]:
    """Start `python -m sidecar serve ARGS` processes (`env=` optional); any still running at
    the end of the test is killed."""
    started: list[ServeProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        started.append(await ServeProcess.start(*args, env=env))
        return started[-1]

    yield start
    for served in started:
        if served.process.returncode is None:
            served.process.kill()
        await served.exited()


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


# A real MLServer (scikit-learn iris), once per session: its venv comes from
# scripts/install-mlserver (about a minute the first time).

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mlserver_bin() -> Path:
    """The repo's .venv-mlserver/bin/mlserver, installed first when missing or out of date."""
    installed = subprocess.run(
        [str(REPO / "scripts" / "install-mlserver")],
        capture_output=True,
        text=True,
        check=False,
    )
    if installed.returncode != 0:
        pytest.fail(f"scripts/install-mlserver failed:\n{installed.stderr[-3000:]}")
    return Path(installed.stdout.splitlines()[-1])


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mlserver(
    mlserver_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MLServer]:
    async with run_mlserver(mlserver_bin, tmp_path_factory.mktemp("mlserver")) as server:
        yield server


# A real PostgreSQL (Debian's package, from scripts/test), once per session, started on first use;
# each test that asks for `postgres_url` gets a fresh database of its own.


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    with postgres_cluster.database() as url:
        yield url


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """`python -m sidecar ARGV` to its end, as a user would run it: with none of this
    environment's SIDECAR_* variables, stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
        check=False,
    )
