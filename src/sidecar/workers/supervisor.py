"""`sidecar serve --workers N`: a supervisor and N proxy processes that share the proxy port.

One event loop uses one core; with N workers the kernel spreads new connections over N
SO_REUSEPORT sockets. Workers are fresh interpreters (`python -m sidecar serve --worker-dir
DIR`), not forks, which would inherit the supervisor's event loop, threads and sockets. Each
keeps its metrics in its own registry and hands the supervisor snapshots of it over a line of
its own (workers/channel.py): on each scrape, every PERIOD seconds (its counts alone), and when
it stops.

The supervisor owns what there is one of per pod: the admin port (/metrics merged over the
workers' snapshots, /healthz, /readyz with its own upstream probe, which every worker's proxy
traffic also informs, through a Unix datagram socket in DIR), the config (it reads the file,
keeps the restart keys, and hands workers the result in DIR/config.msgpack) and the signals. It
restarts a worker that exits, and gives up, raising WorkersFailed, when a worker cannot start at
all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from sidecar.admin import AdminServer, make_admin_app
from sidecar.app import Sidecar, keep_running, make_probe, url_of, watch_config
from sidecar.children import die_with_parent
from sidecar.config import Config, ConfigError
from sidecar.feedback.recorder import FeedbackRecorder
from sidecar.files import write_atomically
from sidecar.logs import RateLimitedLog
from sidecar.memory import freeze_startup
from sidecar.pipeline import dropped_counter
from sidecar.readiness import UpstreamProbe
from sidecar.recorders.labels import OverflowCounter
from sidecar.upstream_metrics import upstream_metrics_of
from sidecar.workers import channel, snapshots
from sidecar.workers.health import HEALTH_SOCKET, HealthInbox, HealthRelay

log = logging.getLogger(__name__)

CONFIG_FILE = "config.msgpack"
MAX_START_FAILURES = 5  # a worker that dies before serving this often in a row is not retried
EXIT_MARGIN = 5.0  # seconds past drain_timeout a worker gets to exit before it is killed
# Seconds a scrape waits for the workers' fresh snapshots; one that has not answered by then is
# seen as of its latest (a worker's event loop answers within a turn: this is for a stuck one).
SCRAPE_WAIT = 1.0


class WorkersFailed(RuntimeError):
    """The workers could not be started; the message says which one and how it exited."""


@dataclass(eq=False)
class _Worker:
    slot: int
    process: asyncio.subprocess.Process
    line: channel.WorkerLine
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
        # Labels posted to the admin port are joined here, against the store the workers write.
        labels_registry = snapshots.SnapshotRegistry()
        self._feedback = label_joiner(config, labels_registry)
        self._merge = snapshots.SnapshotMerge(
            own=[ProcessCollector(registry=None), PlatformCollector(registry=None), labels_registry]
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
        # The model server's metrics are fetched here, once per scrape, not by each worker.
        upstream_metrics = upstream_metrics_of(self.config)
        await self._feedback.open()
        admin = make_admin_app(
            self.registry,
            self._readiness,
            feedback=self._feedback,
            upstream_metrics=upstream_metrics,
            refresh=self._refresh,
        )
        self._admin = AdminServer(admin)
        await self._admin.start(self.config.admin_host, self.config.metrics_port)
        self.admin_url = url_of(self._admin.address)
        extra = {"workers": self.config.workers, "admin": self.admin_url, "port": self.config.port}
        log.info("supervising", extra=extra)

    async def _refresh(self) -> None:
        """Before a scrape: a snapshot from every serving worker, taken now, so that the scrape
        counts every exchange that ended before it; at most SCRAPE_WAIT seconds."""
        lines = [worker.line for worker in self._workers.values() if worker.serving]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SCRAPE_WAIT):
                await asyncio.gather(*(line.fresh() for line in lines))

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
            await worker.line.closed()  # its last snapshot is in
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
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--worker-dir",
                str(self._directory),
                stdin=theirs.fileno(),  # the worker's end of its line (workers/channel.py)
                # A supervisor killed outright must not leave its workers serving the port alone.
                preexec_fn=die_with_parent(),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker's now: a copy of ours would hide its end of file from us
        line = await channel.open_supervisor_end(
            ours,
            functools.partial(self._merge.put, process.pid),
            functools.partial(self._merge.put_counts, process.pid),
        )
        worker = _Worker(slot, process, line, self._config_version)
        if self._stop.is_set():  # stopped while it was being spawned: it must not outlive us
            _signal(worker, signal.SIGTERM)
        return worker

    async def _until_serving(self, worker: _Worker) -> bool:
        """True once the worker serves (its first snapshot is in), False if it exits first."""
        if not await worker.line.until_first():
            return False
        if worker.config_version != self._config_version:
            _signal(worker, signal.SIGHUP)  # the config changed while it started
        return True

    def _retire(self, worker: _Worker) -> None:
        """An exited worker: its gauges go, the counters of its last snapshot stay in the
        merged totals."""
        worker.serving = False
        self._merge.retire(worker.process.pid)

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
        await self._feedback.close()
        if self._inbox is not None:
            self._inbox.close()
        if self._probe is not None:
            await self._probe.stop()
        shutil.rmtree(self._directory, ignore_errors=True)
        log.info("stopped")


def label_joiner(config: Config, registry: CollectorRegistry) -> FeedbackRecorder:
    """The supervisor's feedback recorder: it takes labels on POST /feedback, joins them
    against the store every worker writes its rows into (one SQLite file in WAL mode, which
    SQLite shares between the processes of one host, or one PostgreSQL table), counts them, and
    computes the windowed gauges. It writes no rows, so it opens neither the JSON Lines copy
    nor the sink: each worker has its own."""
    settings = msgspec.structs.replace(config.feedback, jsonl=None, sink_url=None)
    return FeedbackRecorder(
        registry,
        msgspec.structs.replace(config, feedback=settings),
        dropped=dropped_counter(registry),
        overflow=OverflowCounter(registry),
    )


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
    """One worker: the proxy port (shared), no admin port; its metrics go to the supervisor as
    snapshots, over the line on its stdin. Returns after SIGTERM and the drain."""
    registry = snapshots.SnapshotRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    line = await channel.open_worker_end(registry)
    relay = HealthRelay(directory / HEALTH_SOCKET)
    sidecar = Sidecar(config, registry, admin=False, reuse_port=True, health=relay)
    tasks: list[asyncio.Task[None]] = []

    def started() -> None:
        freeze_startup()
        line.send()  # the supervisor takes the first snapshot for "serving"
        tasks.append(asyncio.create_task(_answer_supervisor(line), name="snapshot-requests"))
        tasks.append(asyncio.create_task(line.send_every(channel.PERIOD), name="snapshots"))

    try:
        await sidecar.serve_until_signalled(lambda: read_worker_config(directory), on_start=started)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:  # it served: its last snapshot, after the drain, counts every exchange
            line.send()
        await line.close()
        relay.close()


async def _answer_supervisor(line: channel.SupervisorLine) -> None:
    """Answer the supervisor's requests for snapshots; once it is gone (killed: no one would
    stop us), stop serving."""
    await line.answer()
    log.error("the supervisor is gone; stopping")
    os.kill(os.getpid(), signal.SIGTERM)
