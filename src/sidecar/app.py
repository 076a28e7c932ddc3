"""Wiring, like Knative's sharedmain: Config -> route table -> pipeline -> proxy and admin servers;
signals and drain. No request logic lives here."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from sidecar.admin import make_admin_app
from sidecar.config import Config, ConfigError
from sidecar.extract.compile import build_batch_reader, build_extractor
from sidecar.extract.presets import PRESETS
from sidecar.pipeline import Pipeline
from sidecar.profile import load as load_profile
from sidecar.proxy.http1 import Http1Server
from sidecar.proxy.pool import UpstreamPool
from sidecar.proxy.server import ProxyHandler
from sidecar.readiness import UpstreamProbe
from sidecar.routes import Route, RouteTable

log = logging.getLogger(__name__)


def build_routes(config: Config) -> RouteTable:
    """Configured routes first (they override), then the routes of the top-level preset."""
    return RouteTable(_configured_routes(config))


def _configured_routes(config: Config) -> Iterator[Route]:
    for route in config.routes:
        if route.preset or route.mapping:
            extractor = build_extractor(route.preset, route.mapping)
            batch = build_batch_reader(route.preset, route.mapping)
            yield Route(route.name, route.method.upper(), route.path, extractor, batch)
        else:
            yield Route(route.name, route.method.upper(), route.path)
    if config.preset is not None:
        preset = PRESETS[config.preset]
        extractor = build_extractor(config.preset, config.mapping)
        batch = build_batch_reader(config.preset, config.mapping)
        for preset_route in preset.routes:
            yield Route(preset_route.name, preset_route.method, preset_route.path, extractor, batch)


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
        self._proxy_server: Http1Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self._probe: UpstreamProbe | None = None
        self._pool: UpstreamPool | None = None
        self._pipeline: Pipeline | None = None
        self.proxy_url = ""
        self.admin_url = ""

    async def start(self) -> None:
        config = self.config
        target = urlsplit(config.upstream)
        pool = self._pool = UpstreamPool(
            target.hostname or "127.0.0.1",
            target.port or (443 if target.scheme == "https" else 80),
            tls=target.scheme == "https",
            connect_timeout=config.connect_timeout,
            read_timeout=config.upstream_timeout,
        )
        profile = load_profile(config.drift.profile) if config.drift.profile else None
        pipeline = self._pipeline = Pipeline(config, build_routes(config), self.registry, profile)
        handler = ProxyHandler(pool, pipeline, max_body_bytes=config.max_body_bytes)
        up = Gauge(
            "sidecar_upstream_up",
            "1 while the upstream's health path answers 2xx, from a periodic probe.",
            registry=self.registry,
        )
        self._probe = UpstreamProbe(
            health_url(config),
            interval=config.health_interval,
            up=up,
            lenient=config.health_path is None and config.preset is None,
        )
        await self._probe.start()
        await pipeline.feedback.open()

        self._proxy_server = Http1Server(handler, whole_body_limit=handler.whole_body_limit)
        await self._proxy_server.start(config.host, config.port)

        probe = self._probe
        admin = make_admin_app(self.registry, lambda: probe.status, feedback=pipeline.feedback)
        self._admin_runner = web.AppRunner(admin, access_log=None)
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, config.admin_host, config.metrics_port)
        await admin_site.start()

        self.proxy_url = _url(self._proxy_server.address)
        self.admin_url = _url(self._admin_runner.addresses[0])
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
        if self._proxy_server is not None:
            await self._proxy_server.stop(self.config.drain_timeout)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._probe is not None:
            await self._probe.stop()
        if self._pool is not None:
            await self._pool.close()
        if self._pipeline is not None:
            await self._pipeline.feedback.close()  # after the proxy: its last rows get written
        log.info("stopped")

    def _try_reload(self, read: Callable[[], Config]) -> None:
        try:
            config = read()
        except ConfigError as exc:
            log.error(
                "new config rejected; still serving the previous one", extra={"error": str(exc)}
            )
            return
        self.reload(config)

    def reload(self, config: Config) -> None:
        """Apply a new config while serving. Settings that only take effect at start-up (ports,
        upstream, timeouts, caps) keep their running values, and the log says which."""
        kept = [key for key in RESTART_KEYS if getattr(config, key) != getattr(self.config, key)]
        if kept:
            log.warning(
                "these settings need a restart; kept the running values", extra={"keys": kept}
            )
            config = msgspec.structs.replace(config, **{k: getattr(self.config, k) for k in kept})
        if self._pipeline is not None:
            self._pipeline.reconfigure(config, build_routes(config))
        logging.getLogger().setLevel(config.log_level.upper())
        self.config = config
        log.info("config reloaded", extra={"routes": len(config.routes), "preset": config.preset})

    async def serve_until_signalled(
        self, reload: Callable[[], Config] | None = None, watch: Path | None = None
    ) -> None:
        """Run until SIGTERM or SIGINT, then drain and return. On SIGHUP, and when the file
        `watch` changes, apply the config `reload` returns; a bad one is logged and the running
        one stays."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (
            signal.SIGTERM,  # Sent by `kill` and by Kubernetes when the pod is deleted.
            signal.SIGINT,  # Ctrl-C in a terminal.
        ):
            loop.add_signal_handler(signum, stop.set)
        if reload is not None:
            # Unix signal 1: `kill -HUP <pid>`, the conventional "re-read your config".
            loop.add_signal_handler(signal.SIGHUP, self._try_reload, reload)
        watcher = None
        if reload is not None and watch is not None and self.config.config_watch_interval > 0:
            watcher = asyncio.create_task(self._watch(watch, reload), name="config-watch")
        try:
            await self.start()
        except BaseException:
            await self.stop()  # release what was opened before the failure (a port in use)
            raise
        await stop.wait()
        log.info("signal received, draining", extra={"drain_timeout": self.config.drain_timeout})
        if watcher is not None:
            watcher.cancel()
        await self.stop()

    async def _watch(self, path: Path, read: Callable[[], Config]) -> None:
        """Poll the config file; Kubernetes updates a mounted ConfigMap without any signal."""
        last = await asyncio.to_thread(_file_signature, path)
        while True:
            await asyncio.sleep(self.config.config_watch_interval)
            current = await asyncio.to_thread(_file_signature, path)
            if current != last:
                last = current
                self._try_reload(read)


# Read once at start-up: changing them needs a restart.
RESTART_KEYS = (
    "upstream", "host", "port", "metrics_host", "metrics_port", "upstream_timeout",
    "connect_timeout", "health_path", "health_interval", "drain_timeout", "shutdown_delay",
    "model_name", "model_version", "framework", "max_body_bytes", "label_cap", "model_names",
    "record_queue_size", "config_watch_interval", "feedback", "drift",
)  # fmt: skip


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _default_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def _url(address: tuple[str, int]) -> str:
    host, port = address[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
