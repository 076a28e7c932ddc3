"""The admin port: /metrics, /healthz and /readyz. The proxy port carries none of these."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

ReadinessCheck = Callable[[], tuple[bool, str]]


def make_admin_app(registry: CollectorRegistry, readiness: ReadinessCheck) -> web.Application:
    """Build the admin application around an injected registry and readiness check."""

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

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
