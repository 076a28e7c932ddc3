"""The line between the supervisor and a worker (workers/channel.py), over a real socket pair:
whole snapshots answer the supervisor, periodic ones carry the counts alone."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import Counter, Gauge

from sidecar.workers import channel, snapshots
from sidecar.workers.snapshots import SnapshotRegistry


@dataclass
class Received:
    """What the supervisor's end was handed, in order: ("whole" or "counts", sample names)."""

    snapshots: list[tuple[str, set[str]]] = field(default_factory=list)
    news: asyncio.Event = field(default_factory=asyncio.Event)

    def whole(self, snapshot: bytes) -> None:
        self.snapshots.append(("whole", names(snapshot)))
        self.news.set()

    def counts(self, snapshot: bytes) -> None:
        self.snapshots.append(("counts", names(snapshot)))
        self.news.set()

    async def until(self, count: int) -> None:
        while len(self.snapshots) < count:
            self.news.clear()
            await self.news.wait()


def names(snapshot: bytes) -> set[str]:
    return {sample.name for family in snapshots._decode(snapshot) for sample in family.samples}


@dataclass
class Line:
    supervisor: channel.WorkerLine
    worker: channel.SupervisorLine
    received: Received


@pytest.fixture
async def line() -> AsyncIterator[Line]:
    registry = SnapshotRegistry()
    Counter("ml_requests", "help", registry=registry).inc()
    Gauge("in_flight", "help", multiprocess_mode="livesum", registry=registry).set(1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    received = Received()
    supervisor = await channel.open_supervisor_end(ours, received.whole, received.counts)
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    worker = channel.SupervisorLine(reader, writer, registry)
    yield Line(supervisor, worker, received)
    await worker.close()
    await supervisor.closed()


async def test_periodic_snapshots_carry_counts_and_do_not_count_as_serving(line: Line) -> None:
    sending = asyncio.create_task(line.worker.send_every(0.01))
    first = asyncio.create_task(line.supervisor.until_first())
    await line.received.until(3)
    assert not first.done()  # only a whole snapshot says the worker serves
    sending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sending
    assert {kind for kind, _ in line.received.snapshots} == {"counts"}
    assert line.received.snapshots[0][1] == {"ml_requests_total", "ml_requests_created"}

    line.worker.send()
    assert await first
    assert line.received.snapshots[-1] == (
        "whole",
        {"ml_requests_total", "ml_requests_created", "in_flight"},
    )


async def test_a_request_is_answered_with_a_whole_snapshot(line: Line) -> None:
    answering = asyncio.create_task(line.worker.answer())
    line.worker.send_counts()
    await line.supervisor.fresh()
    assert [kind for kind, _ in line.received.snapshots] == ["counts", "whole"]
    assert "in_flight" in line.received.snapshots[-1][1]
    answering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await answering
