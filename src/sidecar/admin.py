"""The admin port: /metrics, /healthz, /readyz and /feedback. The proxy port has none of these."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from sidecar.admin_http import (
    BodyTooLarge,
    BodyUndecodable,
    Reply,
    Route,
    Router,
    gzipped,
    header,
    json_reply,
    read_body,
)
from sidecar.feedback.recorder import FeedbackError, FeedbackRecorder, parse_feedback
from sidecar.proxy.http1 import Handler, Http1Server, HttpConnection, Request
from sidecar.recorders.labels import PROMETHEUS_SCRAPE, SeriesBirths
from sidecar.upstream_metrics import UpstreamMetrics

ReadinessCheck = Callable[[], tuple[bool, str]]

FEEDBACK_MAX_BYTES = 16 * 1024 * 1024  # 10,000 items with long request ids fit easily
# Bodies up to this with a Content-Length are read before a route starts; larger ones are read
# by /feedback itself, after the token check: an unauthenticated client cannot make us hold more.
WHOLE_BODY_LIMIT = 64 * 1024
STOP_TIMEOUT = 5.0  # seconds a request in flight (a /feedback join) gets when the port closes


def _metrics_route(
    registry: CollectorRegistry,
    upstream: UpstreamMetrics | None,
    refresh: Callable[[], Awaitable[None]] | None,
) -> Route:
    """Our registry, once `refresh` has brought it up to date; with `upstream`, the model
    server's metrics after it, fetched now."""
    births = SeriesBirths(registry)

    def ours(request: Request) -> Collector:
        # A Prometheus scrape is shown each new counter and histogram series at 0 first, so
        # that increase() counts what it gained before (docs/metrics.md, "Guarantees").
        return births.scrape() if header(request, PROMETHEUS_SCRAPE) else registry

    def metrics(request: Request, connection: HttpConnection) -> Reply | Awaitable[Reply]:
        if upstream is None and refresh is None:
            return _exposition(request, ours(request))
        return refreshed(request)

    async def refreshed(request: Request) -> Reply:
        if refresh is not None:
            await refresh()
        if upstream is None:
            return _exposition(request, ours(request))
        return _exposition(request, await upstream.scrape(ours(request)))

    return metrics


def _exposition(request: Request, metrics: Collector) -> Reply:
    # Prometheus text by default, OpenMetrics when the scraper asks for it; gzip if it takes it.
    encoder, content_type = choose_encoder(header(request, b"accept"))
    reply = Reply(200, encoder(metrics), content_type.encode())
    return gzipped(reply, header(request, b"accept-encoding"))


def _healthz(request: Request, connection: HttpConnection) -> Reply:
    return json_reply({"status": "alive"})


def _readyz_route(readiness: ReadinessCheck) -> Route:
    def readyz(request: Request, connection: HttpConnection) -> Reply:
        ready, reason = readiness()
        if ready:
            return json_reply({"status": "ready", "reason": reason})
        return json_reply({"status": "not ready", "reason": reason}, status=503)

    return readyz


def _feedback_route(feedback: FeedbackRecorder) -> Route:
    """POST /feedback: bearer token (when configured), then one item or a list of items."""
    expected = f"Bearer {feedback.token}".encode() if feedback.token else None

    async def handle(request: Request, connection: HttpConnection) -> Reply:
        given = header(request, b"authorization").encode("latin-1")
        if expected is not None and not hmac.compare_digest(given, expected):
            reason = {"error": "a bearer token is required and this one is missing or wrong"}
            challenge = ((b"WWW-Authenticate", b'Bearer realm="sidecar-feedback"'),)
            return json_reply(reason, status=401, headers=challenge)
        try:
            body = await read_body(request, connection, FEEDBACK_MAX_BYTES)
        except BodyTooLarge:
            return json_reply({"error": f"body over {FEEDBACK_MAX_BYTES} bytes"}, status=413)
        except BodyUndecodable as exc:
            return json_reply({"error": str(exc)}, status=400)
        try:
            return json_reply(await feedback.apply(parse_feedback(body)))
        except FeedbackError as exc:
            return json_reply({"error": exc.reason}, status=exc.status)

    return handle


def make_admin_app(
    registry: CollectorRegistry,
    readiness: ReadinessCheck,
    *,
    feedback: FeedbackRecorder | None = None,
    upstream_metrics: UpstreamMetrics | None = None,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> Router:
    """Build the admin routes around an injected registry and readiness check; with a
    feedback recorder they also take labels on POST /feedback; with `upstream_metrics`,
    /metrics adds the model server's own; `refresh` is awaited before each scrape (with
    --workers, the supervisor gathers its workers' snapshots)."""
    router = Router()
    router.add("GET", "/metrics", _metrics_route(registry, upstream_metrics, refresh))
    router.add("GET", "/healthz", _healthz)
    router.add("GET", "/readyz", _readyz_route(readiness))
    if feedback is not None:
        router.add("POST", "/feedback", _feedback_route(feedback))
    return router


class AdminServer:
    """Serves the admin routes: `await start(host, port)` binds (0 = ephemeral), `address`
    then says where; `await stop()` closes."""

    def __init__(self, app: Handler) -> None:
        self._server = Http1Server(app, whole_body_limit=WHOLE_BODY_LIMIT)

    async def start(self, host: str, port: int) -> None:
        await self._server.start(host, port)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address

    async def stop(self) -> None:
        await self._server.stop(STOP_TIMEOUT)
