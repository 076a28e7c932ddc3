"""The load generator behind `sidecar loadtest`: open- and closed-loop schedules, latency stats.

Open loop (`rate`) sends on a fixed timetable whatever the answers do, and measures latency from
the *intended* send time, so a stalled server shows up as latency instead of as fewer, faster
samples (no coordinated omission). Closed loop (`concurrency`) runs C workers per target that each
send the next request when the previous answer arrives. Both stop by themselves: every run is
bounded by a duration and/or a request count, and every request by a timeout.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import numpy as np

__all__ = ["PERCENTILES", "Histogram", "Plan", "Progress", "TargetReport", "error_kind", "run"]

PERCENTILES: Final = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))
_HEADERS: Final = {"Content-Type": "application/json", "User-Agent": "sidecar-loadtest"}


class Histogram:
    """Latencies in log-spaced buckets 1 % wide, 1 µs to ~17 min: fixed memory (16 KiB) however
    long the run, and percentiles within ±0.5 % (the geometric middle of a bucket)."""

    LOW: Final = 1e-6
    GROWTH: Final = 1.01

    def __init__(self) -> None:
        self._scale = 1.0 / math.log(self.GROWTH)
        self.counts = np.zeros(int(math.log(1e3 / self.LOW) * self._scale) + 1, dtype=np.int64)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def record(self, seconds: float) -> None:
        index = int(math.log(max(seconds, self.LOW) / self.LOW) * self._scale)
        self.counts[min(index, len(self.counts) - 1)] += 1
        self.count += 1
        self.total += seconds
        self.min = min(self.min, seconds)
        self.max = max(self.max, seconds)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) in seconds; None when nothing was recorded."""
        if not self.count:
            return None
        rank = max(math.ceil(q / 100.0 * self.count), 1)
        index = int(np.searchsorted(np.cumsum(self.counts), rank))
        middle = self.LOW * self.GROWTH ** (index + 0.5)
        return float(min(max(middle, self.min), self.max))


@dataclass(eq=False)
class TargetStats:
    """What happened to the requests sent to one target URL."""

    url: str
    sent: int = 0
    skipped: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)


@dataclass(frozen=True, slots=True)
class TargetReport:
    """The summary of one target. Latencies in seconds; `throughput` counts answers per second."""

    url: str
    sent: int
    completed: int
    ok: int
    skipped: int
    elapsed: float
    statuses: dict[int, int]
    errors: dict[str, int]
    latency: dict[str, float | None]

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    @classmethod
    def of(cls, stats: TargetStats, elapsed: float) -> TargetReport:
        histogram = stats.latency
        latency = {name: histogram.percentile(q) for name, q in PERCENTILES}
        latency["max"] = histogram.max if histogram.count else None
        latency["mean"] = histogram.total / histogram.count if histogram.count else None
        return cls(
            url=stats.url,
            sent=stats.sent,
            completed=sum(stats.statuses.values()),
            ok=sum(n for status, n in stats.statuses.items() if status < 400),
            skipped=stats.skipped,
            elapsed=elapsed,
            statuses=dict(sorted(stats.statuses.items())),
            errors=dict(sorted(stats.errors.items())),
            latency=latency,
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """One run. `urls` holds one full request URL per target (two with --compare); the k-th
    request to each target carries `bodies(k, drifted)`. Give `rate` (open loop, requests per
    second to each target) or `concurrency` (closed loop, workers per target), and `duration`
    and/or `requests` (per target). Drift starts at `drift_after` seconds or `drift_from` (the
    k-th request), whichever is set."""

    urls: tuple[str, ...]
    bodies: Callable[[int, bool], bytes]
    rate: float | None = None
    concurrency: int | None = None
    duration: float | None = None
    requests: int | None = None
    drift_after: float | None = None
    drift_from: int | None = None
    max_inflight: int = 1000
    timeout: float = 10.0

    def done(self, seq: int, elapsed: float) -> bool:
        if self.requests is not None and seq >= self.requests:
            return True
        return self.duration is not None and elapsed >= self.duration

    def drifted(self, seq: int, elapsed: float) -> bool:
        if self.drift_from is not None:
            return seq >= self.drift_from
        return self.drift_after is not None and elapsed >= self.drift_after


@dataclass(frozen=True, slots=True)
class Progress:
    """A live view for the progress bar, reported a few times a second."""

    elapsed: float
    sent: int
    completed: int
    errors: int
    inflight: int


def error_kind(exc: BaseException) -> str:
    """A short stable name for a failed request: refused, connect, timeout, disconnected, ..."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "refused" if exc.os_error.errno == errno.ECONNREFUSED else "connect"
    for kind, name in _ERROR_KINDS:
        if isinstance(exc, kind):
            return name
    return type(exc).__name__


# First match wins: aiohttp's timeout errors are also connection errors.
_ERROR_KINDS: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (TimeoutError, "timeout"),
    (aiohttp.ServerDisconnectedError, "disconnected"),
    (aiohttp.ClientPayloadError, "payload"),
    (aiohttp.ClientResponseError, "bad response"),
    (aiohttp.ClientError, "client"),
    (OSError, "os"),
)
_FAILURES: Final = (aiohttp.ClientError, TimeoutError, OSError)


class _Run:
    def __init__(self, plan: Plan, session: aiohttp.ClientSession) -> None:
        self.plan = plan
        self.session = session
        self.stats = tuple(TargetStats(url) for url in plan.urls)
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds and is read
        # once per loop iteration, too coarse for sub-millisecond answers.
        self.clock = time.perf_counter
        self.start = self.clock()
        self.inflight = 0
        self.pending: set[asyncio.Task[None]] = set()

    def progress(self) -> Progress:
        return Progress(
            elapsed=self.clock() - self.start,
            sent=sum(s.sent for s in self.stats),
            completed=sum(s.latency.count for s in self.stats),
            errors=sum(s.errors.total() for s in self.stats),
            inflight=self.inflight,
        )

    async def send(self, target: int, body: bytes, intended: float) -> None:
        """POST one body; the caller has counted it as sent and in flight."""
        stats = self.stats[target]
        try:
            async with self.session.post(stats.url, data=body, headers=_HEADERS) as response:
                await response.read()
            stats.statuses[response.status] += 1
            stats.latency.record(self.clock() - intended)
        except _FAILURES as exc:
            stats.errors[error_kind(exc)] += 1
        except asyncio.CancelledError:
            stats.errors["interrupted"] += 1
            raise
        finally:
            self.inflight -= 1

    def _launch(self, target: int, seq: int, drifted: bool) -> bytes:
        self.stats[target].sent += 1
        self.inflight += 1
        return self.plan.bodies(seq, drifted)

    async def open_loop(self, rate: float) -> None:
        """Slot i is due at start + i / (rate x targets) and goes to target i mod targets, with
        the body of request i // targets: targets alternate and each sees `rate`."""
        width = len(self.stats)
        interval = 1.0 / (rate * width)
        for slot in itertools.count():
            seq, target = divmod(slot, width)
            intended = self.start + slot * interval
            if self.plan.done(seq, seq / rate):
                break
            # Sleep even when late (0 s): it yields, so sends start while we catch up.
            await asyncio.sleep(max(intended - self.clock(), 0.0))
            if self.inflight >= self.plan.max_inflight:
                self.stats[target].skipped += 1
                continue
            # Drift by the schedule, not the clock: both targets get the same k-th body.
            body = self._launch(target, seq, self.plan.drifted(seq, seq / rate))
            # Latency counts from the intended time when we are late (the wait is part of it),
            # from the real one when the millisecond timer woke us a little early.
            task = asyncio.create_task(self.send(target, body, min(intended, self.clock())))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        if self.pending:
            await asyncio.wait(self.pending)

    async def closed_loop(self, concurrency: int) -> None:
        """`concurrency` workers per target; each claims the target's next request number."""
        counters = [itertools.count() for _ in self.stats]

        async def worker(target: int) -> None:
            for seq in counters[target]:
                now = self.clock()
                if self.plan.done(seq, now - self.start):
                    return
                body = self._launch(target, seq, self.plan.drifted(seq, now - self.start))
                await self.send(target, body, now)

        async with asyncio.TaskGroup() as group:
            for target, _ in itertools.product(range(len(self.stats)), range(concurrency)):
                group.create_task(worker(target))


async def run(
    plan: Plan,
    progress: Callable[[Progress], None] | None = None,
    stop: asyncio.Event | None = None,
) -> list[TargetReport]:
    """Run `plan` to its end (or until `stop` is set) and summarise each target."""
    connector = aiohttp.TCPConnector(limit=0)  # in flight is bounded by the plan, not the pool
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=plan.timeout),
        auto_decompress=False,  # we only count the bytes
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        state = _Run(plan, session)
        schedule = (
            state.open_loop(plan.rate)
            if plan.rate is not None
            else state.closed_loop(plan.concurrency or 1)
        )
        ticker = asyncio.create_task(_tick(state, progress))
        await _until_stopped(schedule, state, stop or asyncio.Event())
        ticker.cancel()
        elapsed = state.clock() - state.start
        if progress is not None:
            progress(state.progress())
    return [TargetReport.of(stats, elapsed) for stats in state.stats]


async def _until_stopped(
    schedule: Coroutine[Any, Any, None], state: _Run, stop: asyncio.Event
) -> None:
    main = asyncio.create_task(schedule)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if main.done():
        main.result()  # re-raise a bug instead of reporting a half run as complete
        return
    # Stopped early (Ctrl-C): abandon what is in flight; it is counted as interrupted.
    main.cancel()
    for task in state.pending:
        task.cancel()
    await asyncio.gather(main, *state.pending, return_exceptions=True)


async def _tick(state: _Run, progress: Callable[[Progress], None] | None) -> None:
    while progress is not None:
        progress(state.progress())
        await asyncio.sleep(0.2)
