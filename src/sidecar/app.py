"""Wiring, like Knative's sharedmain: Config -> route table -> pipeline -> proxy and admin servers;
signals and drain. No request logic lives here."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from sidecar.admin import make_admin_app
from sidecar.config import Config
from sidecar.extract.compile import build_extractor
from sidecar.extract.presets import PRESETS
from sidecar.pipeline import Pipeline
from sidecar.proxy.server import ProxyHandler
from sidecar.proxy.upstream import open_session
from sidecar.readiness import UpstreamProbe
from sidecar.routes import Route, RouteTable

log = logging.getLogger(__name__)


def build_routes(config: Config) -> RouteTable:
    """Configured routes first (they override), then the routes of the top-level preset."""
    return RouteTable(_configured_routes(config))


def _configured_routes(config: Config) -> Iterator[Route]:
    for route in config.routes:
        extractor = (
            build_extractor(route.preset, route.mapping) if route.preset or route.mapping else None
        )
        yield Route(route.name, route.method.upper(), route.path, extractor)
    if config.preset is not None:
        preset = PRESETS[config.preset]
        extractor = build_extractor(config.preset, config.mapping)
        for preset_route in preset.routes:
            yield Route(preset_route.name, preset_route.method, preset_route.path, extractor)


def health_url(config: Config) -> str:
    path = config.health_path
    if path is None and config.preset is not None:
        path = PRESETS[config.preset].health_path
    return config.upstream.rstrip("/") + (path or "/")


class Sidecar:
    """The running sidecar: `await start()` binds both ports (0 = ephemeral) and returns when
    it serves; `proxy_url` and `admin_url` then say where. `await stop()` drains and closes."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else _default_registry()
        self._proxy_runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._probe: UpstreamProbe | None = None
        self._session: aiohttp.ClientSession | None = None
        self.proxy_url = ""
        self.admin_url = ""

    async def start(self) -> None:
        config = self.config
        session = open_session(
            connect_timeout=config.connect_timeout, read_timeout=config.upstream_timeout
        )
        self._session = session
        pipeline = Pipeline(config, build_routes(config), self.registry)
        handler = ProxyHandler(
            session, config.upstream, pipeline, max_body_bytes=config.max_body_bytes
        )
        up = Gauge(
            "sidecar_upstream_up",
            "1 while the upstream's health path answers 2xx, from a periodic probe.",
            registry=self.registry,
        )
        self._probe = UpstreamProbe(
            session,
            health_url(config),
            interval=config.health_interval,
            up=up,
            lenient=config.health_path is None and config.preset is None,
        )
        await self._probe.start()

        server = web.Server(handler, access_log=None, handler_cancellation=False)
        self._proxy_runner = web.ServerRunner(server, shutdown_timeout=config.drain_timeout)
        await self._proxy_runner.setup()
        proxy_site = web.TCPSite(self._proxy_runner, config.host, config.port)
        await proxy_site.start()

        probe = self._probe
        admin = make_admin_app(self.registry, lambda: probe.status)
        self._admin_runner = web.AppRunner(admin, access_log=None)
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, config.admin_host, config.metrics_port)
        await admin_site.start()

        self.proxy_url = _url(self._proxy_runner)
        self.admin_url = _url(self._admin_runner)
        log.info(
            "serving",
            extra={"proxy": self.proxy_url, "admin": self.admin_url, "upstream": config.upstream},
        )

    async def stop(self) -> None:
        """Fail readiness, stop accepting, let in-flight requests finish (bounded), close."""
        if self._probe is not None:
            self._probe.draining = True
        if self.config.shutdown_delay > 0:
            # Give the load balancer time to see /readyz fail before the port closes.
            await asyncio.sleep(self.config.shutdown_delay)
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._probe is not None:
            await self._probe.stop()
        if self._session is not None:
            await self._session.close()
        log.info("stopped")

    async def serve_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then drain and return."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (
            signal.SIGTERM,  # Sent by `kill` and by Kubernetes when the pod is deleted.
            signal.SIGINT,  # Ctrl-C in a terminal.
        ):
            loop.add_signal_handler(signum, stop.set)
        try:
            await self.start()
        except BaseException:
            await self.stop()  # release what was opened before the failure (a port in use)
            raise
        await stop.wait()
        log.info("signal received, draining", extra={"drain_timeout": self.config.drain_timeout})
        await self.stop()


def _default_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def _url(runner: web.BaseRunner) -> str:
    host, port = runner.addresses[0][:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
