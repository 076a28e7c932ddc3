"""`sidecar serve --workers N`: a supervisor and N proxy processes that share the proxy port.

One event loop uses one core; with N workers the kernel spreads new connections over N
SO_REUSEPORT sockets. Workers are fresh interpreters (`python -m sidecar serve --worker-dir
DIR`), not forks: prometheus_client picks its mmap value store when it is imported, from
PROMETHEUS_MULTIPROC_DIR, so that variable must be set before the worker's first import.

The supervisor owns what there is one of per pod: the admin port (/metrics merged over the
workers, /healthz, /readyz with its own upstream probe, which every worker's proxy traffic also
informs, through a Unix datagram socket in DIR), the config (it reads the file, keeps the
restart keys, and hands workers the result in DIR/config.msgpack) and the signals. It restarts a
worker that exits, and gives up, raising WorkersFailed, when a worker cannot start at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from sidecar.admin import AdminServer, make_admin_app
from sidecar.app import Sidecar, keep_running, make_probe, url_of, watch_config
from sidecar.children import die_with_parent
from sidecar.config import Config, ConfigError
from sidecar.files import write_atomically
from sidecar.logs import RateLimitedLog
from sidecar.memory import freeze_startup
from sidecar.readiness import UpstreamProbe
from sidecar.workers import mpfiles, snapshots
from sidecar.workers.health import HEALTH_SOCKET, HealthInbox, HealthRelay

log = logging.getLogger(__name__)

CONFIG_FILE = "config.msgpack"
MAX_START_FAILURES = 5  # a worker that dies before serving this often in a row is not retried
EXIT_MARGIN = 5.0  # seconds past drain_timeout a worker gets to exit before it is killed
_POLL = 0.02  # seconds between looks at a starting worker


class WorkersFailed(RuntimeError):
    """The workers could not be started; the message says which one and how it exited."""


@dataclass(eq=False)
class _Worker:
    slot: int
    process: asyncio.subprocess.Process
    config_version: int  # of the config file the worker read when it started
    serving: bool = False


class Supervisor:
    """Runs `config.workers` workers until SIGTERM or SIGINT, then drains them and returns."""

    def __init__(
        self,
        config: Config,
        reload: Callable[[], Config] | None = None,
        watch: Path | None = None,
    ) -> None:
        self.config = config
        self._load = reload
        self._watch = watch
        self._directory = Path(tempfile.mkdtemp(prefix="sidecar-workers-"))
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=str(self._directory))  # type: ignore[no-untyped-call]
        self._merge = snapshots.SnapshotMerge(
            self._directory, own=[ProcessCollector(registry=None), PlatformCollector(registry=None)]
        )
        self.registry.register(self._merge)
        self._restarts = Counter(
            "sidecar_worker_restarts",
            "Workers that exited without being asked to and were started again (--workers).",
            registry=self.registry,
        )
        self._probe: UpstreamProbe | None = None
        self._inbox: HealthInbox | None = None
        self._admin: AdminServer | None = None
        self._workers: dict[int, _Worker] = {}
        self._slots: list[asyncio.Task[None]] = []
        self._config_version = 0
        self._stop = asyncio.Event()
        self._failure: str | None = None
        self._complaints = RateLimitedLog(log)
        self.admin_url = ""

    async def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP and a changed config file reload the config."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        watcher = None
        if self._load is not None:
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            if self._watch is not None and self.config.config_watch_interval > 0:
                watcher = asyncio.create_task(
                    watch_config(self._watch, self.config.config_watch_interval, self._reload)
                )
        try:
            await self._open()
            self._slots = [
                asyncio.create_task(self._run_slot(slot)) for slot in range(self.config.workers)
            ]
            await self._stop.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            await self._close()
        if self._failure is not None:
            raise WorkersFailed(self._failure)

    async def _open(self) -> None:
        self._write_config()
        self._probe = make_probe(self.config, self.registry)
        try:
            self._inbox = HealthInbox(self._directory / HEALTH_SOCKET, self._probe)
        except OSError as exc:  # such as a TMPDIR too long for a socket's path (107 bytes)
            log.warning(
                "the workers' proxy traffic will not inform /readyz; the probe alone will",
                extra={"error": str(exc)},
            )
        await self._probe.start()
        self._admin = AdminServer(make_admin_app(self.registry, self._readiness))
        await self._admin.start(self.config.admin_host, self.config.metrics_port)
        self.admin_url = url_of(self._admin.address)
        extra = {"workers": self.config.workers, "admin": self.admin_url, "port": self.config.port}
        log.info("supervising", extra=extra)

    def _readiness(self) -> tuple[bool, str]:
        assert self._probe is not None
        ready, reason = self._probe.status
        if ready and not any(worker.serving for worker in self._workers.values()):
            return False, "no worker is serving yet"
        return ready, reason

    async def _run_slot(self, slot: int) -> None:
        """Keep one worker running: start it, and start another when it exits, until stopped."""
        failures = 0  # exits before serving, in a row
        served = False  # has this slot ever had a worker serving
        while not self._stop.is_set():
            try:
                worker = self._workers[slot] = await self._spawn(slot)
            except OSError as exc:
                self._fail(f"worker {slot} could not be spawned: {exc}")
                return
            worker.serving = await self._until_serving(worker)
            if worker.serving:
                served, failures = True, 0
                log.info("worker serving", extra={"worker": slot, "pid": worker.process.pid})
            code = await worker.process.wait()
            self._retire(worker)
            if self._stop.is_set():
                return
            exit_text = _describe_exit(code)
            if not worker.serving:
                failures += 1
                if not served or failures >= MAX_START_FAILURES:
                    self._fail(
                        f"worker {slot} (pid {worker.process.pid}) {exit_text} before serving"
                        + (f", {failures} times in a row" if failures > 1 else "")
                        + "; giving up (its log lines above say why)"
                    )
                    return
            self._complaints.warning(
                f"worker {slot}",
                "worker exited; starting another",
                worker=slot,
                pid=worker.process.pid,
                exit=exit_text,
            )
            self._restarts.inc()
            # Back off only while restarts fail: a worker that served is replaced at once.
            await asyncio.sleep(0.1 * 2**failures if failures else 0)

    async def _spawn(self, slot: int) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "serve",
            "--worker-dir",
            str(self._directory),
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._directory)},
            # A supervisor killed outright must not leave its workers serving the port alone.
            preexec_fn=die_with_parent(),
        )
        worker = _Worker(slot, process, self._config_version)
        if self._stop.is_set():  # stopped while it was being spawned: it must not outlive us
            _signal(worker, signal.SIGTERM)
        return worker

    async def _until_serving(self, worker: _Worker) -> bool:
        """True once the worker serves (its first snapshot appears), False if it exits first."""
        snapshot = self._snapshot(worker)
        while not snapshot.exists():
            if worker.process.returncode is not None:
                return False
            await asyncio.sleep(_POLL)
        if worker.config_version != self._config_version:
            _signal(worker, signal.SIGHUP)  # the config changed while it started
        return True

    def _snapshot(self, worker: _Worker) -> Path:
        return self._directory / f"{worker.process.pid}{snapshots.SUFFIX}"

    def _retire(self, worker: _Worker) -> None:
        """An exited worker: its live gauges go, its counters stay in the merged totals, and its
        files are folded into the retired ones, so restarts do not grow the directory."""
        worker.serving = False
        pid = worker.process.pid
        try:
            mpfiles.retire(self._directory, pid)
        except OSError as exc:
            self._complaints.warning(
                "retire", "a dead worker's metric files stay unfolded", pid=pid, error=str(exc)
            )
        self._merge.retire(self._snapshot(worker))

    def _fail(self, message: str) -> None:
        self._failure = message
        self._stop.set()

    def _reload(self) -> None:
        assert self._load is not None
        try:
            config = self._load()
        except ConfigError as exc:
            log.error(
                "new config rejected; still serving the previous one", extra={"error": str(exc)}
            )
            return
        self.config = keep_running(self.config, config)
        self._write_config()
        logging.getLogger().setLevel(self.config.log_level.upper())
        for worker in self._workers.values():
            if worker.serving:  # one still starting reads the new file, or is told when it serves
                _signal(worker, signal.SIGHUP)
        log.info("config reloaded", extra={"workers": self.config.workers})

    def _write_config(self) -> None:
        """What workers run: the supervisor's config, minus what the supervisor does for them."""
        # shutdown_delay: the supervisor fails readiness and waits before it signals the workers.
        config = msgspec.structs.replace(self.config, shutdown_delay=0.0)
        write_atomically(self._directory / CONFIG_FILE, msgspec.msgpack.encode(config))
        self._config_version += 1

    async def _close(self) -> None:
        """Fail readiness, let workers drain (bounded), then close the admin port."""
        self._stop.set()  # also when _open failed: nothing may start now
        if self._probe is not None:
            self._probe.draining = True
            if self._slots and self.config.shutdown_delay > 0:
                await asyncio.sleep(self.config.shutdown_delay)
        for worker in self._workers.values():
            _signal(worker, signal.SIGTERM)
        if self._slots:
            _, late = await asyncio.wait(
                self._slots, timeout=self.config.drain_timeout + EXIT_MARGIN
            )
            if late:
                log.warning("workers did not exit in time; killing them")
                for worker in self._workers.values():
                    _signal(worker, signal.SIGKILL)
                await asyncio.wait(late)
        if self._admin is not None:
            await self._admin.stop()
        if self._inbox is not None:
            self._inbox.close()
        if self._probe is not None:
            await self._probe.stop()
        shutil.rmtree(self._directory, ignore_errors=True)
        log.info("stopped")


def _signal(worker: _Worker, signum: signal.Signals) -> None:
    if worker.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
            worker.process.send_signal(signum)


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def read_worker_config(directory: Path) -> Config:
    return msgspec.msgpack.decode((directory / CONFIG_FILE).read_bytes(), type=Config)


async def serve_worker(directory: Path, config: Config) -> None:
    """One worker: the proxy port (shared), no admin port; its custom collectors' samples go
    to a snapshot file for the supervisor. Returns after SIGTERM and the drain."""
    registry = snapshots.LocalRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    snapshot = directory / f"{os.getpid()}{snapshots.SUFFIX}"
    writer = snapshots.SnapshotWriter(registry.local, snapshot)
    relay = HealthRelay(directory / HEALTH_SOCKET)
    sidecar = Sidecar(config, registry, admin=False, reuse_port=True, health=relay)
    ticker: asyncio.Task[None] | None = None

    def started() -> None:
        nonlocal ticker
        freeze_startup()
        ticker = asyncio.create_task(_tick(writer, os.getppid()), name="snapshot")

    try:
        await sidecar.serve_until_signalled(lambda: read_worker_config(directory), on_start=started)
    finally:
        if ticker is not None:
            ticker.cancel()
            writer.write()  # after the drain: the last requests' drift counts are in it
        relay.close()


async def _tick(writer: snapshots.SnapshotWriter, parent: int) -> None:
    """Write a snapshot now (the supervisor takes its appearance for "serving") and every
    PERIOD seconds; stop serving if the supervisor is gone (killed: no one would stop us)."""
    while True:
        writer.write()
        if os.getppid() != parent:
            log.error("the supervisor is gone; stopping")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        await asyncio.sleep(snapshots.PERIOD)
