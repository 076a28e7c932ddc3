"""Load for benchmarks/grpc.sh: unary ModelInfer calls of one iris row (4 FP64 features, raw
contents as tritonclient sends them) to TARGET, over several channels (one HTTP/2 connection
each), as bytes: the driver spends nothing on protobuf.

Two modes. Closed loop (--concurrency N): N calls always in flight, as many as the target
answers. Fixed rate (--rate R): calls started on a schedule whatever the target does, each
call's latency counted from when it was due, so a target that falls behind shows it (no
coordinated omission). Either way it warms up first, then measures for --duration seconds, and
reads the CPU time that the relay (--relay PID: the sidecar) and the upstream (--upstream PID)
spent in that window from /proc/PID/stat (user + system, every thread).

Prints one line: LABEL MODE calls/s p50_ms p99_ms relay_us upstream_us failed, where *_us is
CPU microseconds per answered call ("-" for a process not given).

usage: grpc_driver.py TARGET LABEL (--concurrency N | --rate R) [--duration S] [--warmup S]
                      [--channels K] [--relay PID] [--upstream PID]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import uvloop
from grpc import aio

from sidecar.oip.oip_pb2 import ModelInferRequest

INFER = "/inference.GRPCInferenceService/ModelInfer"
TICK_SECONDS = 1 / os.sysconf("SC_CLK_TCK")
# How often the fixed-rate scheduler wakes to start the calls that are due: below libuv's
# 1 ms timer resolution it would only spin.
SCHEDULER_NAP = 0.001

Call = aio.UnaryUnaryMultiCallable[bytes, bytes]


def iris_request() -> bytes:
    request = ModelInferRequest(model_name="iris", id="bench")
    request.inputs.add(name="input-0", datatype="FP64", shape=[1, 4])
    request.raw_input_contents.append(np.array([5.9, 3.0, 4.2, 1.5], dtype="<f8").tobytes())
    return request.SerializeToString()


REQUEST = iris_request()


@dataclass
class Tally:
    """What the measured window saw: each answered call's seconds, and failures."""

    latencies: list[float] = field(default_factory=list)
    failed: int = 0


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far: fields 14 and 15 of /proc/PID/stat,
    counted after the command name (which may hold spaces). None for no process."""
    if pid is None:
        return None
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_SECONDS


async def timed(call: Call, due: float, tally: Tally) -> None:
    try:
        await call(REQUEST, timeout=10)
    except aio.AioRpcError:
        tally.failed += 1
        return
    tally.latencies.append(time.perf_counter() - due)


async def closed_loop(calls: Sequence[Call], concurrency: int, seconds: float) -> Tally:
    tally = Tally()
    stop = time.perf_counter() + seconds

    async def caller(call: Call) -> None:
        while time.perf_counter() < stop:
            await timed(call, time.perf_counter(), tally)

    await asyncio.gather(*(caller(calls[n % len(calls)]) for n in range(concurrency)))
    return tally


async def fixed_rate(calls: Sequence[Call], rate: float, seconds: float) -> Tally:
    tally = Tally()
    in_flight: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    total = int(rate * seconds)
    sent = 0
    while sent < total:
        due_now = min(total, int((time.perf_counter() - start) * rate) + 1)
        for n in range(sent, due_now):
            task = asyncio.create_task(timed(calls[n % len(calls)], start + n / rate, tally))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        sent = due_now
        await asyncio.sleep(SCHEDULER_NAP)
    await asyncio.gather(*in_flight)
    return tally


async def drive(options: argparse.Namespace) -> str:
    # A local subchannel pool each: channels with the same target would otherwise share one
    # connection, and one connection is one event-loop turn at a time on the server's side.
    channels = [
        aio.insecure_channel(options.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(options.channels)
    ]
    calls: list[Call] = [channel.unary_unary(INFER) for channel in channels]
    try:
        warm = await closed_loop(calls, options.concurrency or 8, options.warmup)
        if not warm.latencies:
            msg = f"no call to {options.target} succeeded while warming up"
            raise SystemExit(msg)
        processes = (options.relay, options.upstream)
        before = [cpu_seconds(pid) for pid in processes]
        started = time.perf_counter()
        if options.rate:
            tally = await fixed_rate(calls, options.rate, options.duration)
        else:
            tally = await closed_loop(calls, options.concurrency, options.duration)
        elapsed = time.perf_counter() - started
        after = [cpu_seconds(pid) for pid in processes]
    finally:
        for channel in channels:
            await channel.close()
    spent = [
        None if then is None or now is None else now - then
        for then, now in zip(before, after, strict=True)
    ]
    return report(options, tally, elapsed, spent)


def report(
    options: argparse.Namespace, tally: Tally, elapsed: float, spent: list[float | None]
) -> str:
    answered = len(tally.latencies)
    quantiles = statistics.quantiles(tally.latencies, n=100, method="inclusive")
    mode = f"rate{options.rate:g}" if options.rate else f"c{options.concurrency}"
    cpu = [
        "-" if seconds is None else f"{seconds * 1e6 / max(answered, 1):.0f}" for seconds in spent
    ]
    columns = [
        options.label, mode, f"{answered / elapsed:.0f}", f"{quantiles[49] * 1e3:.3f}",
        f"{quantiles[98] * 1e3:.3f}", *cpu, str(tally.failed),
    ]  # fmt: skip
    return " ".join(columns)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="host:port of the gRPC server")
    parser.add_argument("label", help="the first word of the line printed")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=int, default=0, help="closed loop: calls in flight")
    mode.add_argument("--rate", type=float, default=0.0, help="fixed rate: calls per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--channels", type=int, default=4, help="connections to the target")
    parser.add_argument("--relay", type=int, help="PID of the sidecar (or relay), to time it")
    parser.add_argument("--upstream", type=int, help="PID of the upstream, to time its CPU")
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(uvloop.run(drive(parse())), flush=True)
