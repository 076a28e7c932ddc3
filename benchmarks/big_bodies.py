"""Big JSON bodies and aborted uploads against a real sidecar (run by benchmarks/big_bodies.sh).

Three cases, each on a fresh `sidecar serve --preset kserve-v1` (pinned to CPU 1) in front of a
canned KServe V1 upstream started here: one prediction per row, like KServe's sklearnserver,
after MODEL_US_PER_ROW microseconds per row (1: 0.45 s for 9.7 MB, what a fast model server
takes to decode and predict that; 0 makes the client's stream as fast as the relay goes).

1. latency: one-row requests at RATE/s (open loop: latency counts from the intended send time)
   for DUR seconds alone, then again while another client posts 5 to 10 MB `{"instances": ...}`
   bodies back to back on one connection: p50 and p99 of each. Then the same stream through a
   sidecar without the preset, which relays and parses nothing: the share of the relay itself.
2. peak: 16 bodies of 9.7 MB posted at once; the sidecar's peak RSS (VmHWM, reset first) until
   its counters say each was recorded or dropped, against its RSS before and the bound
   baseline + 3 x bytes in flight.
3. aborts: ABORTS uploads that announce 1 MiB, send half of it and close (FIN or RST, in turn;
   every other one asks for 100 Continue, so the handler already runs); RSS after the burst and
   after IDLE seconds without traffic, against the baseline.

Modes: `big_bodies.py SIDECAR_CMD...` drives the cases; `--upstream PORT` is the canned model;
`--big-client PORT SECONDS FILE...` posts the files back to back and prints what it sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httptools
import numpy as np
import orjson
import uvloop

PORT = int(os.environ.get("PORT", "18005"))  # the sidecar's proxy port; admin on PORT + 1
UPSTREAM_PORT = int(os.environ.get("UPSTREAM_PORT", "18011"))
RATE = float(os.environ.get("RATE", "200"))
DUR = float(os.environ.get("DUR", "15"))
ABORTS = int(os.environ.get("ABORTS", "2000"))
IDLE = float(os.environ.get("IDLE", "30"))
CASES = os.environ.get("CASES", "latency relay peak aborts").split()
MODEL_US_PER_ROW = float(os.environ.get("MODEL_US_PER_ROW", "1"))
WORK = Path(os.environ.get("WORK", "/tmp/sidecar-bench"))
PATH = b"/v1/models/iris:predict"
PRESET = "kserve-v1"
SMALL = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
BIG_MB = (5.0, 7.5, 9.7)  # the streamed sizes; the peak case sends the largest
AT_ONCE = 16
MIB = 1024 * 1024


# The canned model


class _Model(asyncio.Protocol):
    """Answers every request with one class per row it sent: `{"predictions": [0, 1, 2, ...]}`,
    MODEL_US_PER_ROW microseconds per row later (waiting, not busy: others are answered)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        rows = body.count(b"],") + 1  # compact or not, rows are separated by "],"
        classes = (b"0,1,2," * (rows // 3 + 1))[: 2 * rows - 1]
        reply = b'{"predictions":[' + classes + b"]}"
        answer = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        )
        assert self.transport is not None
        delay = rows * MODEL_US_PER_ROW / 1e6
        asyncio.get_running_loop().call_later(
            delay, self.transport.write, answer % (len(reply), reply)
        )


async def serve_model(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Model, "127.0.0.1", port)
    await server.serve_forever()


# Clients


def request(body: bytes, extra: bytes = b"", length: int | None = None) -> bytes:
    """A whole request; with `length`, the head announces that many bytes whatever follows."""
    announced = len(body) if length is None else length
    return (
        b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (PATH, announced, extra, body)
    )


async def read_reply(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    await reader.readexactly(int(match[1]) if match else 0)
    return int(head.split(b" ", 2)[1])


async def latency(seconds: float, rate: float) -> list[float]:
    """Open loop: a one-row request every 1/rate s on idle keep-alive connections (opened as
    needed); each latency counts from when the request was due. 10 s counts as failed."""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    latencies: list[float] = []
    message = request(SMALL)

    async def one(due: float) -> None:
        connection = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", PORT)
        try:
            async with asyncio.timeout(10):
                connection[1].write(message)
                await read_reply(connection[0])
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            latencies.append(10.0)
            connection[1].close()
            return
        latencies.append(time.perf_counter() - due)
        idle.append(connection)

    start = time.perf_counter()  # not loop.time(): uvloop's counts whole milliseconds
    tasks = []
    for n in range(int(seconds * rate)):
        due = start + n / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return latencies


async def big_client(port: int, seconds: float, files: list[str]) -> None:
    """Post the bodies back to back on one connection for `seconds`; print what was sent."""
    bodies = [request(Path(name).read_bytes()) for name in files]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = total = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        message = bodies[sent % len(bodies)]
        writer.write(message)
        await writer.drain()
        await read_reply(reader)
        sent += 1
        total += len(message)
    writer.close()
    print(json.dumps({"bodies": sent, "mb": round(total / 1e6, 1)}))


async def post_at_once(body: bytes, count: int) -> list[int]:
    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
        writer.write(request(body))
        await writer.drain()
        status = await read_reply(reader)
        writer.close()
        return status

    return await asyncio.gather(*(one() for _ in range(count)))


async def aborted_uploads(count: int, at_once: int = 16) -> None:
    """Announce 1 MiB, send half, give the sidecar a moment to read it, then leave: FIN and
    RST in turn; every other upload asks for 100 Continue, so the handler has started."""
    half = b"[" * (MIB // 2)
    slots = asyncio.Semaphore(at_once)

    async def one(n: int) -> None:
        async with slots:
            _, writer = await asyncio.open_connection("127.0.0.1", PORT)
            expect = b"Expect: 100-continue\r\n" if n % 4 >= 2 else b""
            writer.write(request(half, expect, length=MIB))
            await writer.drain()
            await asyncio.sleep(0.05)
            if n % 2:  # RST: close at once, discarding what is unsent
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()

    await asyncio.gather(*(one(n) for n in range(count)))


# The sidecar process


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def until_quiet(pid: int, limit: float = 300.0) -> float:
    """Wait until the process has used under 5% of a core for a second (it has done recording
    what it was sent); how long that took."""
    started = time.monotonic()
    ticks, per_second = cpu_ticks(pid), os.sysconf("SC_CLK_TCK")
    while time.monotonic() - started < limit:
        await asyncio.sleep(1.0)
        now = cpu_ticks(pid)
        if now - ticks < 0.05 * per_second:
            break
        ticks = now
    return time.monotonic() - started


async def until_read(total: float, limit: float = 300.0) -> float:
    """Wait until the sidecar has recorded or dropped `total` payloads; how long that took."""
    started = time.monotonic()
    while payloads() < total and time.monotonic() - started < limit:
        await asyncio.sleep(0.5)
    return time.monotonic() - started


def payloads() -> float:
    """Payloads recorded (batch sizes observed) or dropped, so far."""
    counts = scrape()
    return sum(v for k, v in counts.items() if not k.startswith("ml_requests_total"))


async def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    sys.exit(f"nothing listens on port {port}")


def start_sidecar(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", "1", *command])


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(30)


async def fresh_sidecar(command: list[str]) -> subprocess.Popen[bytes]:
    """A new sidecar, warmed up by 2 s of one-row requests, then left to settle."""
    process = start_sidecar(command)
    await wait_port(PORT)
    await latency(2.0, RATE)
    await until_quiet(process.pid)
    return process


def scrape() -> dict[str, float]:
    """The sidecar's counters that say what became of payloads."""
    with socket.create_connection(("127.0.0.1", PORT + 1), timeout=60) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    wanted = r"^(ml_batch_size_count|sidecar_dropped_observations_total|ml_requests_total)"
    found: dict[str, float] = {}
    for line in text.splitlines():
        if re.match(wanted, line):
            name, value = line.rsplit(" ", 1)
            found[name] = found.get(name, 0.0) + float(value)
    return found


def percentiles(latencies: list[float]) -> str:
    ms = np.asarray(latencies) * 1000
    failed = int((ms >= 10_000).sum())
    return (
        f"p50 {np.percentile(ms, 50):7.1f} ms  p99 {np.percentile(ms, 99):7.1f} ms  "
        f"max {ms.max():7.1f} ms  ({len(ms)} requests, {failed} failed)"
    )


def make_bodies() -> list[Path]:
    """Iris-like rows of 4 two-decimal floats, as many as make each size (MB)."""
    rng = np.random.default_rng(0)
    values = np.round(rng.normal((5.8, 3.0, 3.8, 1.2), (0.8, 0.4, 1.8, 0.8), (500_000, 4)), 2)
    row_bytes = len(orjson.dumps(values[:10_000].tolist())) / 10_000
    paths = []
    for mb in BIG_MB:
        path = WORK / f"big-{mb}.json"
        path.write_bytes(orjson.dumps({"instances": values[: int(mb * 1e6 / row_bytes)].tolist()}))
        paths.append(path)
    return paths


async def drive(command: list[str]) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    bodies = make_bodies()
    sizes = ", ".join(f"{p.stat().st_size / 1e6:.1f}" for p in bodies)
    print(f"sidecar: {shlex.join(command)}")
    print(f"big bodies: {sizes} MB of {{'instances': [[4 floats], ...]}}")
    model = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, __file__, "--upstream", str(UPSTREAM_PORT)]
    )
    try:
        await wait_port(UPSTREAM_PORT)
        if {"latency", "relay"} & set(CASES):
            print(f"\n== one-row requests at {RATE:.0f}/s, {DUR:.0f} s each")
        if "latency" in CASES:
            await latency_case(command, bodies)
        if "relay" in CASES:
            relay_only = [arg for arg in command if arg not in ("--preset", PRESET)]
            await latency_case(relay_only, bodies, "without the preset (relay only)")
        if "peak" in CASES:
            await peak_case(command, bodies[-1])
        if "aborts" in CASES:
            await abort_case(command)
    finally:
        model.terminate()


async def latency_case(command: list[str], bodies: list[Path], label: str = "") -> None:
    sidecar = await fresh_sidecar(command)
    try:
        quiet = [] if label else await latency(DUR, RATE)
        client = await asyncio.create_subprocess_exec(
            "taskset", "-c", "0", sys.executable, __file__, "--big-client", str(PORT),
            str(DUR + 1), *map(str, bodies), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(1.0)  # the first big body is on its way
        loaded = await latency(DUR, RATE)
        sent = json.loads((await client.communicate())[0])
        took = await until_quiet(sidecar.pid)
        counts = scrape()
    finally:
        stop(sidecar)
    if quiet:
        print(f"alone:                   {percentiles(quiet)}")
    print(f"while big bodies stream: {percentiles(loaded)} {label}")
    print(
        f"  big bodies sent: {sent['bodies']} ({sent['mb']} MB); the sidecar was busy "
        f"{took:.1f} s after the last one"
    )
    for name, value in sorted(counts.items()):
        print(f"  {name} {value:.0f}")


async def peak_case(command: list[str], body: Path) -> None:
    sidecar = await fresh_sidecar(command)
    try:
        baseline = rss_mib(sidecar.pid)
        Path(f"/proc/{sidecar.pid}/clear_refs").write_text("5")  # reset VmHWM to VmRSS
        data = body.read_bytes()
        before = payloads()
        statuses = await post_at_once(data, AT_ONCE)
        took = await until_read(before + AT_ONCE)
        peak = rss_mib(sidecar.pid, "VmHWM")
        after = rss_mib(sidecar.pid)
    finally:
        stop(sidecar)
    reply = 2 * (data.count(b"],") + 1)  # the model's answer: two bytes a row, "0,"
    in_flight = AT_ONCE * (len(data) + reply) / MIB
    bound = baseline + 3 * in_flight
    print(f"\n== {AT_ONCE} bodies of {len(data) / 1e6:.1f} MB at once (statuses {set(statuses)})")
    print(
        f"RSS baseline {baseline:.0f} MiB, peak {peak:.0f} MiB, {after:.0f} MiB once all were "
        f"read or dropped ({took:.1f} s after the replies)"
    )
    print(
        f"bytes in flight {in_flight:.0f} MiB (bodies and replies): bound baseline + 3 x that = "
        f"{bound:.0f} MiB -> {'within' if peak <= bound else 'OVER'}"
    )


async def abort_case(command: list[str]) -> None:
    sidecar = await fresh_sidecar(command)
    try:
        baseline = rss_mib(sidecar.pid)
        started = time.monotonic()
        await aborted_uploads(ABORTS)
        burst = time.monotonic() - started
        await asyncio.sleep(1.0)
        after = rss_mib(sidecar.pid)
        await asyncio.sleep(IDLE)
        idle = rss_mib(sidecar.pid)
    finally:
        stop(sidecar)
    print(f"\n== {ABORTS} aborted uploads of 1 MiB (half sent; FIN/RST, 100-continue or not)")
    print(
        f"RSS baseline {baseline:.0f} MiB; 1 s after the burst ({burst:.1f} s) {after:.0f} MiB; "
        f"after {IDLE:.0f} s idle {idle:.0f} MiB = {100 * (idle / baseline - 1):+.0f}% "
        f"-> {'within' if idle <= 1.2 * baseline else 'OVER'} 20%"
    )


def main() -> None:
    if sys.argv[1] == "--upstream":
        uvloop.run(serve_model(int(sys.argv[2])))
    elif sys.argv[1] == "--big-client":
        uvloop.run(big_client(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]))
    else:
        uvloop.run(drive(sys.argv[1:]))


if __name__ == "__main__":
    main()
