"""Wiring, like Knative's sharedmain: Config -> route table -> pipeline -> proxy and admin servers;
signals and drain. No request logic lives here."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from sidecar.admin import AdminServer, make_admin_app
from sidecar.config import Config, ConfigError
from sidecar.drift.profile import load as load_profile
from sidecar.extract.compile import build_readers
from sidecar.extract.presets import PRESETS
from sidecar.oip import METHODS, route_name
from sidecar.pipeline import Pipeline, Ticket
from sidecar.proxy.http1 import Http1Server
from sidecar.proxy.pool import UpstreamHealth, UpstreamPool
from sidecar.proxy.server import ProxyHandler
from sidecar.readiness import UpstreamProbe, question_for
from sidecar.routes import Route, RouteTable
from sidecar.upstream_metrics import upstream_metrics_of

if TYPE_CHECKING:
    from sidecar.proxy.grpc_relay import GrpcRelay

log = logging.getLogger(__name__)


def build_routes(config: Config) -> RouteTable:
    """Configured routes first (they override), then the routes of the top-level preset, then
    (with gRPC on) a route for each method of the inference service, to name it."""
    routes = _configured_routes(config)
    if config.grpc_port is None:
        return RouteTable(routes)
    return RouteTable(
        [*routes, *(Route(route_name(path), "POST", path) for path in sorted(METHODS))]
    )


def _configured_routes(config: Config) -> Iterator[Route]:
    for route in config.routes:
        if not (route.preset or route.mapping):
            yield Route(route.name, route.method.upper(), route.path)
            continue
        extractor, batch = build_readers(route.preset, route.mapping)
        generative = route.preset is not None and PRESETS[route.preset].generative
        inject = config.inject_usage if route.inject_usage is None else route.inject_usage
        yield Route(
            route.name, route.method.upper(), route.path, extractor, batch,
            generative=generative, inject_usage=generative and inject,
        )  # fmt: skip
    if config.preset is not None:
        preset = PRESETS[config.preset]
        extractor, batch = build_readers(config.preset, config.mapping)
        inject = preset.generative and config.inject_usage
        for preset_route in preset.routes:
            yield Route(
                preset_route.name, preset_route.method, preset_route.path, extractor, batch,
                generative=preset.generative, inject_usage=inject,
            )  # fmt: skip


def make_probe(config: Config, registry: CollectorRegistry) -> UpstreamProbe:
    """The readiness probe of the upstream and its gauge (started by the caller)."""
    up = Gauge(
        "sidecar_upstream_up",
        "1 while the upstream is reachable (by the latest word of the probe or of the proxy's "
        "traffic) and its readiness question (health path, model status) last answered ready.",
        # Only the process serving the admin port probes (with --workers, the supervisor).
        multiprocess_mode="livemax",
        registry=registry,
    )
    return UpstreamProbe(question_for(config), interval=config.health_interval, up=up)


class Sidecar:
    """The running sidecar: `await start()` binds both ports (0 = ephemeral) and returns when
    it serves; `proxy_url` and `admin_url` then say where. `await stop()` drains and closes.

    A worker of `--workers N` (sidecar.workers) runs with `admin=False`: no admin port and no
    probe, the supervisor has those; and `reuse_port=True`, as its siblings bind the same port.
    What its proxy's traffic says of the upstream goes to `health` (the supervisor's probe, by
    way of sidecar.workers); with `admin=True` it goes to this process's own probe.
    """

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry | None = None,
        *,
        admin: bool = True,
        reuse_port: bool = False,
        health: UpstreamHealth | None = None,
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else _default_registry()
        self._admin = admin
        self._reuse_port = reuse_port
        self._health = health
        self._proxy_server: Http1Server | None = None
        self._admin_server: AdminServer | None = None
        self._probe: UpstreamProbe | None = None
        self._pool: UpstreamPool | None = None
        self._pipeline: Pipeline | None = None
        self._grpc: GrpcRelay[Ticket] | None = None
        self.proxy_url = ""
        self.admin_url = ""
        self.grpc_address = ""  # host:port, once started with grpc_port set

    async def start(self) -> None:
        config = self.config
        target = urlsplit(config.upstream)
        if self._admin:
            self._probe = make_probe(config, self.registry)
        pool = self._pool = UpstreamPool(
            target.hostname or "127.0.0.1",
            target.port or (443 if target.scheme == "https" else 80),
            tls=target.scheme == "https",
            connect_timeout=config.connect_timeout,
            read_timeout=config.upstream_timeout,
            keepalive_timeout=config.upstream_keepalive_timeout,
            # The proxy's traffic is the freshest word on the upstream: readiness follows it.
            health=self._probe or self._health,
        )
        profile = load_profile(config.drift.profile) if config.drift.profile else None
        pipeline = self._pipeline = Pipeline(
            config, build_routes(config), self.registry, profile, feedback_joins=self._admin
        )
        handler = ProxyHandler(
            pool,
            pipeline,
            max_body_bytes=config.max_body_bytes,
            reply_request_id=config.reply_request_id,
        )
        if self._probe is not None:
            await self._probe.start()
        await pipeline.feedback.open()

        self._proxy_server = Http1Server(
            handler,
            whole_body_limit=handler.whole_body_limit,
            send_timeout=config.client_send_timeout,
            body_timeout=config.client_body_timeout,
        )
        await self._proxy_server.start(config.host, config.port, reuse_port=self._reuse_port)
        self.proxy_url = url_of(self._proxy_server.address)
        if config.grpc_port is not None and config.grpc_upstream is not None:
            self._grpc = await start_grpc(
                config, pipeline, config.grpc_port, config.grpc_upstream, self._reuse_port
            )
            self.grpc_address = self._grpc.address

        if self._probe is not None:
            probe = self._probe
            admin = make_admin_app(
                self.registry,
                lambda: probe.status,
                feedback=pipeline.feedback,
                upstream_metrics=upstream_metrics_of(config),
            )
            self._admin_server = AdminServer(admin)
            await self._admin_server.start(config.admin_host, config.metrics_port)
            self.admin_url = url_of(self._admin_server.address)
        log.info(
            "serving",
            extra={
                "proxy": self.proxy_url,
                "admin": self.admin_url,
                "upstream": config.upstream,
                **({"grpc": self.grpc_address} if self._grpc else {}),
            },
        )

    async def stop(self) -> None:
        """Fail readiness, stop accepting, let in-flight requests finish (bounded), close."""
        if self._probe is not None:
            self._probe.draining = True
        if self.config.shutdown_delay > 0:
            # Give the load balancer time to see /readyz fail before the port closes.
            await asyncio.sleep(self.config.shutdown_delay)
        if self._grpc is not None:  # beside the HTTP port: both drain at once
            grpc_stopped = asyncio.ensure_future(self._grpc.stop(self.config.drain_timeout))
        if self._proxy_server is not None:
            await self._proxy_server.stop(self.config.drain_timeout)
        if self._grpc is not None:
            await grpc_stopped
        if self._admin_server is not None:
            await self._admin_server.stop()
        if self._probe is not None:
            await self._probe.stop()
        if self._pool is not None:
            await self._pool.close()
        if self._pipeline is not None:
            self._pipeline.flush()  # exchanges still waiting for the next drain
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
        config = keep_running(self.config, config)
        if self._pipeline is not None:
            self._pipeline.reconfigure(config, build_routes(config))
        logging.getLogger().setLevel(config.log_level.upper())
        self.config = config
        log.info("config reloaded", extra={"routes": len(config.routes), "preset": config.preset})

    async def serve_until_signalled(
        self,
        reload: Callable[[], Config] | None = None,
        watch: Path | None = None,
        *,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        """Run until SIGTERM or SIGINT, then drain and return. On SIGHUP, and when the file
        `watch` changes, apply the config `reload` returns; a bad one is logged and the running
        one stays. `on_start` is called once the sidecar serves."""
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
            watcher = asyncio.create_task(
                watch_config(
                    watch,
                    self.config.config_watch_interval,
                    functools.partial(self._try_reload, reload),
                ),
                name="config-watch",
            )
        try:
            await self.start()
        except BaseException:
            await self.stop()  # release what was opened before the failure (a port in use)
            raise
        if on_start is not None:
            on_start()
        await stop.wait()
        log.info("signal received, draining", extra={"drain_timeout": self.config.drain_timeout})
        if watcher is not None:
            watcher.cancel()
        await self.stop()


async def watch_config(path: Path, interval: float, changed: Callable[[], None]) -> None:
    """Poll the config file; Kubernetes updates a mounted ConfigMap without any signal."""
    last = await asyncio.to_thread(_file_signature, path)
    while True:
        await asyncio.sleep(interval)
        current = await asyncio.to_thread(_file_signature, path)
        if current != last:
            last = current
            changed()


# Read once at start-up: changing them needs a restart.
RESTART_KEYS = (
    "upstream", "host", "port", "metrics_host", "metrics_port", "upstream_timeout",
    "connect_timeout", "client_send_timeout", "client_body_timeout", "upstream_keepalive_timeout",
    "health_path", "health_interval", "drain_timeout", "upstream_metrics",
    "upstream_metrics_timeout",
    "shutdown_delay", "model_name", "model_version", "framework", "max_body_bytes", "label_cap",
    "model_names", "record_queue_size", "config_watch_interval", "workers", "feedback", "drift",
    "grpc_port", "grpc_upstream", "grpc_max_message_bytes", "reply_request_id",
)  # fmt: skip


def keep_running(running: Config, new: Config) -> Config:
    """`new` with the restart keys at their running values; the log names the ones it kept."""
    kept = [key for key in RESTART_KEYS if getattr(new, key) != getattr(running, key)]
    if not kept:
        return new
    log.warning("these settings need a restart; kept the running values", extra={"keys": kept})
    return msgspec.structs.replace(new, **{key: getattr(running, key) for key in kept})


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


async def start_grpc(
    config: Config, pipeline: Pipeline, port: int, upstream: str, reuse_port: bool
) -> GrpcRelay[Ticket]:
    """The gRPC listener, started. grpcio is imported here, and only with gRPC on: it costs
    every process about 10 MB (tests/test_footprint.py)."""
    from sidecar.proxy.grpc_relay import GrpcRelay

    relay = GrpcRelay(
        upstream,
        pipeline,
        max_message_bytes=config.grpc_max_message_bytes,
        upstream_timeout=config.upstream_timeout,
        max_body_bytes=config.max_body_bytes,
    )
    await relay.start(config.host, port, reuse_port=reuse_port)
    return relay


def url_of(address: tuple[str, int]) -> str:
    host, port = address[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
