"""Is the upstream ready to serve? A probe of what the model server says of itself, or better of
the model, and the proxy's own traffic; read by /readyz and a gauge.

What the probe asks (`question_for`):

- `health_path` when it is set: GET, 2xx is ready.
- With a preset, its checks (sidecar.extract.presets.base.ReadyCheck): those of the model when
  its name is known (`named_model`), else the server's own health.
- With `grpc_upstream` and neither: the Open Inference Protocol's gRPC ServerReady, or
  ModelReady when the model's name is known.
- Otherwise GET /, where any answer below 500 will do: the server is up, and we cannot know
  which of its paths would say more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import quote, urljoin, urlsplit

import orjson
from prometheus_client import Gauge

from sidecar import __version__
from sidecar.config import Config
from sidecar.extract.presets import PRESETS
from sidecar.extract.presets.base import ReadyCheck
from sidecar.oip import SERVICE
from sidecar.proxy.pool import UpstreamPool
from sidecar.proxy.upstream import UpstreamError

if TYPE_CHECKING:
    import grpc.aio

log = logging.getLogger(__name__)

# Seconds between probes while not ready, when health_interval is longer. The pod is then out of
# the load balancer, so no proxy traffic comes to tell of a recovery: only a probe can. A probe
# of a server that is down costs a refused connection, and one that hangs waits its timeout
# before the next starts (one probe at a time).
RECHECK = 1.0
MAX_REDIRECTS = 10  # followed on the upstream's own host and port, as aiohttp's client did
# About the most of a body a check keeps to judge (a list of models); the rest is read and
# dropped, so a larger one is cut short, is no longer JSON, and does not say ready.
MAX_JUDGED_BODY = 1024 * 1024
# Config's default model_name: a label for a model nobody named, not a name a server knows.
UNNAMED_MODEL = "model"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEADERS = [(b"User-Agent", f"sidecar/{__version__} readiness".encode()), (b"Accept", b"*/*")]


class Finding(NamedTuple):
    """What one probe found: ready or not, why, and whether the upstream answered at all."""

    ready: bool
    reason: str
    reachable: bool = True


def unreachable(reason: str) -> Finding:
    return Finding(False, reason, reachable=False)


class ReadinessQuestion(Protocol):
    """How the probe asks: `open` once with the time a whole question may take, then `ask` as
    often as the probe likes, each bounded by that time; `close` at the end."""

    def open(self, timeout: float) -> None: ...

    async def ask(self) -> Finding: ...

    async def close(self) -> None: ...


class UpstreamProbe:
    """Ready while the upstream is reachable and its readiness question's last answer was ready;
    draining overrides everything. Each question has its authority:

    - Reachable: the freshest word on it, from either the probe (answered, or not) or the
      proxy's traffic (it is the pool's UpstreamHealth: `upstream_failed` when a connection is
      refused, times out or closes unanswered; `upstream_answered` when a reply comes after that).
    - Ready to serve: the readiness question's last answer, which only the probe asks.

    So a proxied reply after a failure makes the upstream ready at once if the question last
    said ready, but not if it said, say, 503 (model not loaded): a reply shows the server is
    up, not that the model is. Both proxy signals also start a probe at once, to confirm.
    """

    def __init__(self, question: ReadinessQuestion, *, interval: float, up: Gauge) -> None:
        self._question = question
        self._interval = interval
        self._timeout = min(interval, 5.0)  # for a whole probe: connect, redirects, every byte
        self._up = up
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # probe now, rather than when the interval is over
        self._answer = (False, "the upstream has not answered yet")  # its last answer
        self._unreachable: str | None = None  # why not, while the last word is "unreachable"
        self._signals = 0  # proxy signals so far: tells a probe whether one came while it ran
        self._ready = False
        self.draining = False

    @property
    def status(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: shutting down"
        return self._upstream_status()

    def _upstream_status(self) -> tuple[bool, str]:
        if self._unreachable is not None:
            return False, self._unreachable
        return self._answer

    async def start(self) -> None:
        """Probe once (so readiness is known when serving starts), then keep probing."""
        self._question.open(self._timeout)
        await self.probe()
        self._task = asyncio.create_task(self._loop(), name="upstream-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._question.close()

    async def probe(self) -> None:
        signals = self._signals
        found = await self._question.ask()
        if found.reachable:
            self._answer = found.ready, found.reason
        # A proxy signal that came while the probe ran is fresher than what the probe's
        # connection saw; the signal also asked for the probe that follows this one.
        if signals == self._signals:
            self._unreachable = None if found.reachable else found.reason
        self._publish()

    def upstream_failed(self, reason: str) -> None:
        """Not ready at once, as the proxy's traffic says; and probe."""
        self._signals += 1
        self._unreachable = f"proxy traffic: {reason}"
        self._publish()
        self._wake.set()

    def upstream_answered(self) -> None:
        """Reachable again: ready at once if the health path last said so; and probe, since a
        server that has just come back may not have loaded its model yet."""
        self._signals += 1
        self._unreachable = None
        self._publish()
        self._wake.set()

    def _publish(self) -> None:
        ready, reason = self._upstream_status()
        if ready != self._ready:
            self._ready = ready
            log.info("upstream readiness changed", extra={"ready": ready, "reason": reason})
        self._up.set(1 if ready else 0)

    async def _loop(self) -> None:
        """One probe at a time: a wake-up that comes while one runs starts the next at once,
        and any number of them start only that one."""
        while True:
            delay = self._interval if self._ready else min(self._interval, RECHECK)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            await self.probe()


@dataclass(frozen=True, slots=True)
class HttpCheck:
    """One request to the upstream and what of its answer means ready: a 2xx (anything below
    500 if `lenient`) and, if `says_ready` is set, that it holds of the body's JSON (None if the
    body is not JSON). `expects` says what it looks for, in the reason."""

    url: str
    method: str = "GET"
    says_ready: Callable[[Any], bool] | None = None
    expects: str = ""
    lenient: bool = False

    @property
    def label(self) -> str:
        return self.url if self.method == "GET" else f"{self.method} {self.url}"

    def judge(self, status: int, body: bytes) -> Finding:
        answered = f"{self.label} answered {status}"
        if not (status < 500 if self.lenient else 200 <= status < 300):
            return Finding(False, answered)
        if self.says_ready is None or self.says_ready(_json(body)):
            return Finding(True, answered)
        return Finding(False, f"{answered} without {self.expects}")


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


class HttpReadiness:
    """Asks the upstream over HTTP: each check in turn, on one keep-alive connection; ready when
    all say so. The first that does not is the reason."""

    def __init__(self, *checks: HttpCheck) -> None:
        self._checks = checks
        self._timeout = 5.0
        self._pool: UpstreamPool | None = None

    def open(self, timeout: float) -> None:
        # A pool of its own, not the proxy's: the probe's failures must not count as traffic's.
        target = urlsplit(self._checks[0].url)
        tls = target.scheme == "https"
        self._timeout = timeout
        self._pool = UpstreamPool(
            target.hostname or "127.0.0.1",
            target.port or (443 if tls else 80),
            tls=tls,
            connect_timeout=timeout,
            read_timeout=timeout,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def ask(self) -> Finding:
        asking = self._checks[0]
        reasons = []
        try:
            async with asyncio.timeout(self._timeout):
                for asking in self._checks:
                    found = asking.judge(*await self._fetch(asking))
                    if not found.ready:
                        return found
                    reasons.append(found.reason)
        except (UpstreamError, TimeoutError) as exc:
            return unreachable(f"{asking.label} unreachable: {type(exc).__name__} {exc}".strip())
        return Finding(True, "; ".join(reasons))

    async def _fetch(self, check: HttpCheck) -> tuple[int, bytes]:
        """Send the check, following redirects on the same host and port; the status and body
        of the last answer. Each body is read to its end, so that the connection can be reused;
        only a check that judges the body keeps it (up to MAX_JUDGED_BODY and a chunk)."""
        assert self._pool is not None, "open() makes the pool"
        url = check.url
        for _ in range(MAX_REDIRECTS + 1):
            target = urlsplit(url)
            path = (target.path or "/") + (f"?{target.query}" if target.query else "")
            response = await self._pool.request(check.method, path.encode(), _HEADERS, None)
            body = bytearray()
            try:
                while chunk := await response.read():
                    if check.says_ready is not None and len(body) < MAX_JUDGED_BODY:
                        body += chunk
            finally:
                response.release()
            location = _location(response.raw_headers) if response.status in _REDIRECTS else None
            if location is None:
                break
            following = urljoin(url, location)
            if urlsplit(following)[:2] != target[:2]:
                break  # another host: its status is the answer
            url = following
        return response.status, bytes(body)


def _location(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"location":
            return value.decode("latin-1")
    return None


# The Open Inference Protocol's readiness calls, by their gRPC method names.
SERVER_READY = f"/{SERVICE}/ServerReady"
MODEL_READY = f"/{SERVICE}/ModelReady"


class GrpcReadiness:
    """Asks an Open Inference Protocol gRPC server (Triton, MLServer, KServe) whether it is
    ready (ServerReady), or whether the model is (ModelReady, by name, no version: the server
    picks the one an unversioned call gets, and model_version is a label, not necessarily a
    version the server knows). grpc is imported only here, when this is what asks: it costs
    the process about 8 MB."""

    def __init__(self, target: str, model: str | None) -> None:
        self._target = target
        self._model = model
        self._timeout = 5.0
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.UnaryUnaryMultiCallable[Any, Any] | None = None
        self._request: object = None

    @property
    def label(self) -> str:
        asked = "ServerReady" if self._model is None else f"ModelReady {self._model}"
        return f"grpc {self._target} {asked}"

    def open(self, timeout: float) -> None:
        import grpc  # here: only a sidecar that asks over gRPC pays for it

        from sidecar.oip import oip_pb2

        self._timeout = timeout
        # Reconnect at most a second after the server went away (gRPC's own backoff grows to
        # two minutes): a probe while disconnected fails at once and says nothing new.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._channel = grpc.aio.insecure_channel(self._target, options=options)
        if self._model is None:
            self._request = oip_pb2.ServerReadyRequest()
            self._call = self._channel.unary_unary(
                SERVER_READY,
                request_serializer=oip_pb2.ServerReadyRequest.SerializeToString,
                response_deserializer=oip_pb2.ServerReadyResponse.FromString,
            )
        else:
            self._request = oip_pb2.ModelReadyRequest(name=self._model)
            self._call = self._channel.unary_unary(
                MODEL_READY,
                request_serializer=oip_pb2.ModelReadyRequest.SerializeToString,
                response_deserializer=oip_pb2.ModelReadyResponse.FromString,
            )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def ask(self) -> Finding:
        import grpc

        assert self._call is not None, "open() makes the call"
        try:
            reply = await self._call(self._request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return unreachable(f"{self.label} unreachable: {code.name}")
            # Answered: no such model (NOT_FOUND), no such service (UNIMPLEMENTED), ...
            return Finding(False, f"{self.label}: {code.name} {error.details() or ''}".strip())
        return Finding(reply.ready, f"{self.label} answered ready={str(reply.ready).lower()}")


def named_model(config: Config) -> str | None:
    """The model readiness asks for: the one name of `model_names`, else `model_name` if it
    was set. None when no name is known, or several are (which of them must be loaded is not
    for the sidecar to say)."""
    if config.model_names:
        return config.model_names[0] if len(config.model_names) == 1 else None
    return None if config.model_name == UNNAMED_MODEL else config.model_name


def question_for(config: Config) -> ReadinessQuestion:
    """What the probe asks the upstream, as the module's docstring says."""
    base = config.upstream.rstrip("/")
    if config.health_path is not None:
        return HttpReadiness(HttpCheck(base + config.health_path))
    model = named_model(config)
    if config.preset is not None:
        preset = PRESETS[config.preset]
        if model is None or not preset.model_ready:
            return HttpReadiness(_http_check(base, preset.health, ""))
        return HttpReadiness(*(_http_check(base, check, model) for check in preset.model_ready))
    if config.grpc_upstream is not None:
        return GrpcReadiness(config.grpc_upstream, model)
    return HttpReadiness(HttpCheck(base + "/", lenient=True))


def _http_check(base: str, check: ReadyCheck, model: str) -> HttpCheck:
    path = check.path.replace("{model}", quote(model, safe=""))
    says_ready = check.says_ready
    return HttpCheck(
        base + path,
        check.method,
        None if says_ready is None else lambda body: says_ready(body, model),
        check.expects,
    )
