"""`sidecar serve --workers N`, with real processes: a supervisor, workers sharing the proxy
port through SO_REUSEPORT, merged metrics (exact at every scrape, and across workers killed or
stopped), a worker killed mid-stream, reload, exits.

Which worker holds which connection is read from /proc (Linux, as SO_REUSEPORT spreading is)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.cli import main
from sidecar.demo.model import FEATURES, sample_rows
from sidecar.workers import channel
from sidecar.workers.health import HEALTH_SOCKET, HealthInbox, HealthRelay
from sidecar.workers.supervisor import CONFIG_FILE
from tests.conftest import CannedUpstream, ServeProcess, reserved_port
from tests.test_drift_e2e import write_reference
from tests.test_readiness import restartable_upstream, until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


@dataclass
class Running:
    process: asyncio.subprocess.Process
    port: int
    metrics_port: int
    log: list[dict[str, Any]]  # the supervisor's log lines so far

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def workers(self) -> set[int]:
        return _children(self.process.pid)

    def serving(self) -> set[int]:
        """The workers the supervisor has seen serve (their first snapshot is in): a scrape
        counts them."""
        return {line["pid"] for line in self.log if line.get("msg") == "worker serving"}


@asynccontextmanager
async def supervisor(upstream: str, *extra: str, workers: int = 2) -> AsyncIterator[Running]:
    """`sidecar serve --workers N` on a proxy port held for it (`reserved_port`) and an admin
    port it picks, read from its "supervising" line; yields once every worker listens; on exit
    SIGTERMs it and checks it exits 0."""
    with reserved_port() as port:
        served = await ServeProcess.start(
            *("--upstream", upstream, "--host", "127.0.0.1", "--port", str(port)),
            *("--metrics-port", "0", "--workers", str(workers), "--drain-timeout", "5", *extra),
            env={**os.environ, "SIDECAR_SHUTDOWN_DELAY": "0"},  # no load balancer to wait for
        )
        process = served.process
        try:
            running = Running(
                process, port, await served.port("supervising", "admin"), served.lines
            )
            await _until(lambda: len(_listening(port)) == workers, process)
            await _until(lambda: len(running.workers()) == workers, process)
            await _until(lambda: running.workers() <= running.serving(), process)
            yield running
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            code, _ = await served.exited()  # also after a failure: reap it
    assert code == 0


async def _until(condition: Callable[[], bool], process: asyncio.subprocess.Process) -> None:
    for _ in range(1500):
        if condition():
            return
        assert process.returncode is None, f"sidecar exited with {process.returncode}"
        await asyncio.sleep(0.02)
    pytest.fail("condition not reached")


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _tcp() -> Iterator[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every IPv4 TCP socket."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    for line in lines:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        yield local, remote, fields[3], int(fields[9])


def _listening(port: int) -> list[int]:
    return [inode for local, _, state, inode in _tcp() if local == port and state == "0A"]


def _owners(port: int, pids: set[int]) -> dict[int, int]:
    """Client port -> pid of the worker that holds the accepted connection."""
    by_inode = {inode: remote for local, remote, state, inode in _tcp() if local == port}
    owners = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                remote = by_inode.get(int(target[8:-1]))
                if remote is not None:
                    owners[remote] = pid
    return owners


def _client_port(response: aiohttp.ClientResponse) -> int:
    assert response.connection is not None
    assert response.connection.transport is not None
    return int(response.connection.transport.get_extra_info("sockname")[1])


async def _metric_sum(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    async with session.get(url) as response:
        text = await response.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def _until_metric(
    session: aiohttp.ClientSession, url: str, name: str, expected: float, **labels: str
) -> None:
    """Poll until the merged sum equals `expected` exactly (for what a scrape does not wait
    for: a worker that is starting, streams still being relayed)."""
    seen = None
    for _ in range(200):
        seen = await _metric_sum(session, url, name, **labels)
        if seen == expected:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{name}{labels}: {seen}, expected {expected}")


async def test_two_workers_share_the_port_and_merged_counts_are_exact(
    toy_model: str, tmp_path: Path
) -> None:
    """400 KServe V1 requests over 32 connections: both workers serve some, and a scrape right
    after the last reply has the merged request, prediction and drift counters equal to what
    was sent, exactly."""
    reference = tmp_path / "reference.csv"
    write_reference(reference, 4000)
    profile = tmp_path / "profile.json"
    assert main(["profile", "build", str(reference), "-o", str(profile)]) == 0
    rng = random.Random(5)
    batches = [sample_rows(rng, rng.randint(1, 3)) for _ in range(400)]
    args = ("--preset", "kserve-v1", "--model-name", "iris", "--profile", str(profile))
    async with supervisor(toy_model, *args) as running:
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=connector) as session:
            gate = asyncio.Semaphore(32)

            async def predict(rows: list[list[float]]) -> int:
                async with (
                    gate,
                    session.post(
                        f"{running.proxy}/v1/models/iris:predict", json={"instances": rows}
                    ) as response,
                ):
                    return len((await response.json())["predictions"])

            predicted = await asyncio.gather(*(predict(rows) for rows in batches))
            owners = _owners(running.port, running.workers())
            assert set(owners.values()) == running.workers()  # both hold connections

            metrics = running.metrics
            assert await _metric_sum(session, metrics, "ml_requests_total", code="200") == 400
            assert await _metric_sum(session, metrics, "ml_predictions_total") == sum(predicted)
            rows = sum(map(len, batches))
            for feature in FEATURES:
                bins = await _metric_sum(session, metrics, "ml_drift_bin_total", feature=feature)
                pit = await _metric_sum(session, metrics, "ml_drift_pit_count", feature=feature)
                assert (bins, pit) == (rows, rows)
            assert await _metric_sum(session, metrics, "ml_requests_in_progress") == 0
            # The pod's open files: the 32 connections the workers hold are among them.
            assert await _metric_sum(session, metrics, "process_open_fds") > 32


async def test_a_killed_worker_is_replaced_and_only_its_clients_notice(
    canned_upstream: CannedUpstream,
) -> None:
    """kill -9 one worker while 16 streams are open: its streams end in a closed connection,
    the other worker's finish intact, a new worker takes its place, no counter goes down."""
    async with (
        supervisor(canned_upstream.url, "--health-path", "/health") as running,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session,
    ):
        metrics = running.metrics
        for _ in range(20):
            async with session.get(f"{running.proxy}/json") as response:
                assert response.status == 200
        assert await _metric_sum(session, metrics, "ml_requests_total") == 20

        streams = [await session.get(f"{running.proxy}/sse") for _ in range(16)]
        for response in streams:
            assert await response.content.readline() == b"data: first\n"
        owners = _owners(running.port, running.workers())
        holders = [owners[_client_port(response)] for response in streams]
        victim, survivor = sorted(set(holders))  # both workers hold some streams
        # In flight: each worker's own, summed (multiprocess_mode="livesum").
        assert await _metric_sum(session, metrics, "ml_requests_in_progress") == 16
        before = await _metric_sum(session, metrics, "ml_requests_total")

        os.kill(victim, signal.SIGKILL)
        canned_upstream.sse_release.set()
        for response, holder in zip(streams, holders, strict=True):
            if holder == survivor:
                rest = await response.content.read()
                assert rest == b"\n" + b"".join(f"data: event {i}\n\n".encode() for i in range(3))
            else:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.content.read()
            response.release()

        await _until_replaced(running, victim)
        for _ in range(50):
            async with session.get(f"{running.proxy}/json") as response:
                assert response.status == 200
        finished = holders.count(survivor)
        await _until_metric(session, metrics, "ml_requests_total", 20 + finished + 50)
        assert await _metric_sum(session, metrics, "ml_requests_total") >= before
        assert await _metric_sum(session, metrics, "sidecar_worker_restarts_total") == 1
        assert await _metric_sum(session, metrics, "ml_requests_in_progress") == 0


async def _send(session: aiohttp.ClientSession, running: Running, requests: int) -> None:
    """`requests` requests, each on a new connection: both workers serve some (all to one: odds
    of 2 in 2^requests)."""
    for _ in range(requests):
        async with session.get(f"{running.proxy}/json") as response:
            assert response.status == 200


async def test_every_scrape_counts_all_traffic_before_it_and_sigkills_lose_none_of_it(
    canned_upstream: CannedUpstream,
) -> None:
    """kill -9 a worker five times, with requests in between: a scrape right after the requests
    counts them all, exactly (every worker snapshots for it), and after every kill, with that
    scrape its last snapshot, the merged counts stay exact. The workers' directory holds no
    metric files, however many have died."""
    async with (
        supervisor(canned_upstream.url) as running,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
    ):
        directory = _worker_directory(min(running.workers()))
        metrics, sent = running.metrics, 0
        for kill in range(1, 6):
            await _send(session, running, 20)
            sent += 20
            assert await _metric_sum(session, metrics, "ml_requests_total") == sent

            victim = sorted(running.workers())[kill % 2]
            os.kill(victim, signal.SIGKILL)
            await _until_replaced(running, victim)
            assert await _metric_sum(session, metrics, "ml_requests_total") == sent
            assert await _metric_sum(session, metrics, "ml_request_duration_seconds_count") == sent
            assert await _metric_sum(session, metrics, "sidecar_worker_restarts_total") == kill
        assert sorted(path.name for path in directory.iterdir()) == [CONFIG_FILE, HEALTH_SOCKET]


async def test_a_worker_killed_unscraped_keeps_what_its_last_periodic_snapshot_counted(
    canned_upstream: CannedUpstream,
) -> None:
    """No scrape between the requests and kill -9: the worker sent a snapshot of its own since
    (every PERIOD seconds), so its requests stay counted, exactly."""
    async with (
        supervisor(canned_upstream.url) as running,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
    ):
        await _send(session, running, 20)
        await asyncio.sleep(2.5 * channel.PERIOD)
        victim = min(running.workers())
        os.kill(victim, signal.SIGKILL)
        await _until_replaced(running, victim)
        assert await _metric_sum(session, running.metrics, "ml_requests_total") == 20


async def test_counts_stay_exact_across_workers_stopped_gracefully(
    canned_upstream: CannedUpstream,
) -> None:
    """SIGTERM a worker right after requests, three times, no scrape in between: it drains and
    sends its last snapshot as it exits, so after every restart the merged counts are exact."""
    async with (
        supervisor(canned_upstream.url) as running,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
    ):
        metrics = running.metrics
        for stop in range(1, 4):
            await _send(session, running, 20)
            victim = sorted(running.workers())[stop % 2]
            os.kill(victim, signal.SIGTERM)
            await _until_replaced(running, victim)
            assert await _metric_sum(session, metrics, "ml_requests_total") == 20 * stop
            assert await _metric_sum(session, metrics, "sidecar_worker_restarts_total") == stop


async def test_merged_latency_buckets_carry_trace_exemplars(
    canned_upstream: CannedUpstream,
) -> None:
    """A traced request's exemplar reaches the supervisor's OpenMetrics scrape, as it does one
    process's."""
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with (
        supervisor(canned_upstream.url) as running,
        aiohttp.ClientSession() as session,
    ):
        headers = {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
        async with session.get(f"{running.proxy}/json", headers=headers) as response:
            assert response.status == 200
        openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with session.get(running.metrics, headers=openmetrics) as response:
            text = await response.text()
    traced = [line for line in text.splitlines() if f'# {{trace_id="{trace}"}}' in line]
    assert {line.split("{", 1)[0] for line in traced} == {
        "ml_request_duration_seconds_bucket",
        "ml_upstream_duration_seconds_bucket",
    }


async def _until_replaced(running: Running, victim: int) -> None:
    """Until the supervisor has reaped `victim` (and retired it) and a new worker serves."""
    # Reaped first: a killed worker's socket may still listen until its exit is complete.
    await _until(
        lambda: victim not in running.workers() and len(_listening(running.port)) == 2,
        running.process,
    )
    await _until(lambda: running.workers() <= running.serving(), running.process)


async def test_a_workers_failed_request_reaches_readyz_at_once(tmp_path: Path) -> None:
    """health_interval 30 s: the upstream stops, a request through a worker gets a 502, and the
    supervisor's /readyz says 503 within a second; the upstream comes back, a request through a
    worker succeeds, and /readyz says 200 within a second."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(json.dumps({"health_interval": 30, "config_watch_interval": 0}))
    async with (
        restartable_upstream() as upstream,
        supervisor(upstream.url, "--health-path", "/health", "--config", str(config)) as running,
        aiohttp.ClientSession() as session,
    ):

        def readyz_says(status: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                url = f"http://127.0.0.1:{running.metrics_port}/readyz"
                async with session.get(url) as response:
                    return response.status == status

            return check

        await until(readyz_says(200), 30.0, "ready once a worker serves")
        await upstream.stop()
        async with session.get(f"{running.proxy}/predict") as response:
            assert response.status == 502
        await until(readyz_says(503), 1.0, "not ready")
        await upstream.start()
        async with session.get(f"{running.proxy}/predict") as response:
            assert response.status == 200
        await until(readyz_says(200), 1.0, "ready again")


async def test_the_health_relay_hands_a_workers_word_to_the_supervisor(tmp_path: Path) -> None:
    """What a worker's pool reports reaches the supervisor's end in order, reasons intact; with
    no supervisor to hear it, reporting neither raises nor waits."""
    heard: list[str] = []

    class Heard:
        def upstream_failed(self, reason: str) -> None:
            heard.append(f"failed: {reason}")

        def upstream_answered(self) -> None:
            heard.append("answered")

    inbox = HealthInbox(tmp_path / HEALTH_SOCKET, Heard())
    relay, unheard = HealthRelay(tmp_path / HEALTH_SOCKET), HealthRelay(tmp_path / "nobody")
    try:
        relay.upstream_failed("cannot connect to 127.0.0.1:9: Connection refused")
        relay.upstream_answered()
        unheard.upstream_failed("nobody hears this")

        async def both() -> bool:
            return len(heard) == 2

        await until(both, 1.0, "both messages arrived")
        assert heard == ["failed: cannot connect to 127.0.0.1:9: Connection refused", "answered"]
    finally:
        relay.close()
        unheard.close()
        inbox.close()


def _worker_directory(pid: int) -> Path:
    """The --worker-dir a worker was started with: the supervisor's directory."""
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return Path(arguments[arguments.index(b"--worker-dir") + 1].decode())


async def test_sighup_reloads_every_worker(canned_upstream: CannedUpstream, tmp_path: Path) -> None:
    """The supervisor reads the changed file and hands it to the workers: a new route applies
    in all of them."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(json.dumps({"upstream": canned_upstream.url, "config_watch_interval": 0}))
    async with (
        supervisor(canned_upstream.url, "--config", str(config)) as running,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
    ):
        route = {"name": "echo", "path": "/echo/{model}"}
        config.write_text(json.dumps({"upstream": canned_upstream.url, "routes": [route]}))
        running.process.send_signal(signal.SIGHUP)
        sent = 0
        for _ in range(100):
            # 32 new connections: both workers get some (all to one: odds of 2 in 2^32).
            echoed = await _metric_sum(session, running.metrics, "ml_requests_total", route="echo")
            for _ in range(32):
                async with session.post(f"{running.proxy}/echo/m", data=b"x") as response:
                    assert response.status == 200
            sent += 32
            await _until_metric(session, running.metrics, "ml_requests_total", sent)
            now = await _metric_sum(session, running.metrics, "ml_requests_total", route="echo")
            if now - echoed == 32:
                break
        else:
            pytest.fail("the workers never all used the new route")


async def test_a_taken_port_makes_the_supervisor_give_up(canned_upstream: CannedUpstream) -> None:
    """Workers that cannot bind exit; the supervisor does not restart them forever but exits 1
    and says why."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "sidecar", "serve", "--upstream", canned_upstream.url),
            *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"),
            *("--workers", "2"),
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    last = json.loads(stderr.decode().strip().splitlines()[-1])
    assert last["msg"] == "cannot serve"
    assert "exited with code 1 before serving; giving up" in last["error"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--workers", "0"), "key `workers` has value 0; workers must be at least 1, got 0"),
        (("--workers", "2", "--port", "0"), "port is 0 (any free port)"),
    ],
)
def test_bad_worker_settings_exit_2_before_serving(
    flags: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--upstream", "http://127.0.0.1:9", *flags]) == 2
    assert message in capsys.readouterr().err
