"""The line between the supervisor and each of its workers: metrics snapshots, asked for and sent.

The supervisor makes a Unix stream socket pair for each worker it starts and hands the worker
its end as stdin (as inetd hands a service its connection): no path to agree on, no flag, and
each end sees the other go (end of file) at once, however it went.

The supervisor asks with a request number (8 bytes), one higher each time. The worker answers
with a whole snapshot of its registry (workers/snapshots.py), framed as the highest request
number it has read (8 bytes), the snapshot's length (4 bytes), whether it is whole (1 byte) and
the snapshot: a whole one tagged n or more was taken after request n arrived. A worker also
sends snapshots unasked: a whole one when it starts serving (the supervisor takes the first for
"serving") and when it stops, after its drain; and every PERIOD seconds one of its counts alone
(counters and histograms), so that a worker killed outright loses only what it counted since,
without computing every second the gauges (drift scores) that only a scrape reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

from sidecar.workers.snapshots import SnapshotRegistry, counts_of, snapshot_of

PERIOD = 1.0  # seconds between a worker's unasked snapshots: what a SIGKILL can lose at most

_REQUEST = struct.Struct("!Q")  # request number
_HEADER = struct.Struct("!QI?")  # highest request number read, snapshot length, whole
_STDIN = 0  # the worker's end, where the supervisor put it


class WorkerLine:
    """The supervisor's end of one worker's line. Every whole snapshot that arrives goes to
    `on_snapshot`, every snapshot of counts to `on_counts`; fresh() asks for a whole one and
    waits for it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_snapshot: Callable[[bytes], None],
        on_counts: Callable[[bytes], None],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_snapshot = on_snapshot
        self._on_counts = on_counts
        self._asked = 0  # the last request number sent
        self._answered = -1  # the tag of the latest whole snapshot; -1 before the first
        self._gone = False  # the worker's end is closed, and all it sent is taken
        self._news = asyncio.Condition()
        self._receiving = asyncio.create_task(self._receive(), name="worker-line")

    async def until_first(self) -> bool:
        """True once the worker's first snapshot is in (it serves), False if it went first."""
        await self._until(lambda: self._answered >= 0)
        return self._answered >= 0

    async def fresh(self) -> None:
        """Ask for a snapshot; return once one taken since has arrived, or the worker is gone
        (then its last snapshot stands)."""
        if self._gone:
            return
        self._asked += 1
        asked = self._asked
        self._writer.write(_REQUEST.pack(asked))
        await self._until(lambda: self._answered >= asked)

    async def closed(self) -> None:
        """Return once the worker's end is closed and all it sent has been taken."""
        await self._receiving

    async def _until(self, reached: Callable[[], bool]) -> None:
        async with self._news:
            await self._news.wait_for(lambda: reached() or self._gone)

    async def _receive(self) -> None:
        try:
            while True:
                tag, size, whole = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
                snapshot = await self._reader.readexactly(size)
                if not whole:
                    self._on_counts(snapshot)
                    continue
                self._on_snapshot(snapshot)
                self._answered = tag
                async with self._news:
                    self._news.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker is gone; a snapshot it was cut off in the middle of is not counted
        finally:
            self._writer.close()
            self._gone = True
            # An idle lock is taken without waiting: this runs in a cancelled task too.
            async with self._news:
                self._news.notify_all()


class SupervisorLine:
    """A worker's end of its line: snapshots of everything `registry` exports."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        registry: SnapshotRegistry,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._registry = registry
        self._asked = 0  # the highest request number read

    def send(self) -> None:
        """A whole snapshot, taken now."""
        if not self._writer.is_closing():
            self._write(snapshot_of(self._registry), whole=True)

    def send_counts(self) -> None:
        """A snapshot of the counts alone, taken now."""
        if not self._writer.is_closing():
            self._write(counts_of(self._registry), whole=False)

    def _write(self, snapshot: bytes, *, whole: bool) -> None:
        self._writer.writelines((_HEADER.pack(self._asked, len(snapshot), whole), snapshot))

    async def answer(self) -> None:
        """Answer every request as it comes; return when the supervisor is gone."""
        try:
            while True:
                (self._asked,) = _REQUEST.unpack(await self._reader.readexactly(_REQUEST.size))
                self.send()
                await self._writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def send_every(self, period: float) -> None:
        """A snapshot of the counts every `period` seconds, until the supervisor is gone."""
        try:
            while True:
                await asyncio.sleep(period)
                self.send_counts()
                await self._writer.drain()
        except ConnectionError:
            return

    async def close(self) -> None:
        """Close the line once all that was sent is out (the last snapshot with it)."""
        self._writer.close()
        with contextlib.suppress(ConnectionError):  # the supervisor is gone: no one counts it
            await self._writer.wait_closed()


async def open_supervisor_end(
    sock: socket.socket, on_snapshot: Callable[[bytes], None], on_counts: Callable[[bytes], None]
) -> WorkerLine:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    return WorkerLine(reader, writer, on_snapshot, on_counts)


async def open_worker_end(registry: SnapshotRegistry) -> SupervisorLine:
    """The worker's end: its stdin, as the supervisor started it."""
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=_STDIN))
    return SupervisorLine(reader, writer, registry)
