"""The admin port: /metrics, /healthz, /readyz and /feedback. The proxy port has none of these."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from sidecar.feedback.recorder import FeedbackError, FeedbackRecorder, parse_feedback

ReadinessCheck = Callable[[], tuple[bool, str]]


FEEDBACK_MAX_BYTES = 16 * 1024 * 1024  # 10,000 items with long request ids fit easily


def _feedback_handler(
    feedback: FeedbackRecorder,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """POST /feedback: bearer token (when configured), then one item or a list of items."""
    expected = f"Bearer {feedback.token}".encode() if feedback.token else None

    async def handle(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "").encode()
        if expected is not None and not hmac.compare_digest(given, expected):
            reason = {"error": "a bearer token is required and this one is missing or wrong"}
            headers = {"WWW-Authenticate": 'Bearer realm="sidecar-feedback"'}
            return web.json_response(reason, status=401, headers=headers)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            reason = {"error": f"body over {FEEDBACK_MAX_BYTES} bytes"}
            return web.json_response(reason, status=413)
        try:
            return web.json_response(await feedback.apply(parse_feedback(body)))
        except FeedbackError as exc:
            return web.json_response({"error": exc.reason}, status=exc.status)

    return handle


def make_admin_app(
    registry: CollectorRegistry,
    readiness: ReadinessCheck,
    *,
    feedback: FeedbackRecorder | None = None,
) -> web.Application:
    """Build the admin application around an injected registry and readiness check; with a
    feedback recorder it also takes labels on POST /feedback."""

    async def metrics(request: web.Request) -> web.Response:
        # Prometheus text by default; OpenMetrics when the scraper asks for it.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encoder(registry))
        response.headers["Content-Type"] = content_type
        return response

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        ready, reason = readiness()
        if ready:
            return web.json_response({"status": "ready", "reason": reason})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)

    app = web.Application(client_max_size=FEEDBACK_MAX_BYTES)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if feedback is not None:
        app.router.add_post("/feedback", _feedback_handler(feedback))
    return app


class AdminServer:
    """Serves an admin application: `await start(host, port)` binds (0 = ephemeral), `address`
    then says where; `await stop()` closes."""

    def __init__(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self, host: str, port: int) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._runner.addresses[0][:2]
        return str(host), int(port)

    async def stop(self) -> None:
        await self._runner.cleanup()
