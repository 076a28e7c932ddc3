"""Is the upstream ready? A probe of its health path and the proxy's own traffic, read by /readyz
and a gauge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from urllib.parse import urljoin, urlsplit

from prometheus_client import Gauge

from sidecar import __version__
from sidecar.proxy.pool import UpstreamPool
from sidecar.proxy.upstream import UpstreamError

log = logging.getLogger(__name__)

# Seconds between probes while not ready, when health_interval is longer. The pod is then out of
# the load balancer, so no proxy traffic comes to tell of a recovery: only a probe can. A probe
# of a server that is down costs a refused connection, and one that hangs waits its timeout
# before the next starts (one probe at a time).
RECHECK = 1.0
MAX_REDIRECTS = 10  # followed on the upstream's own host and port, as aiohttp's client did
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEADERS = [(b"User-Agent", f"sidecar/{__version__} readiness".encode()), (b"Accept", b"*/*")]


class UpstreamProbe:
    """Ready while the upstream is reachable and its health path's last answer was ready;
    draining overrides everything. Each question has its authority:

    - Reachable: the freshest word on it, from either the probe (connected, or not) or the
      proxy's traffic (it is the pool's UpstreamHealth: `upstream_failed` when a connection is
      refused, times out or closes unanswered; `upstream_answered` when a reply comes after that).
    - Ready to serve: the health path's last answer, which only the probe asks. 2xx means ready;
      with no health path configured (`lenient`) anything below 500 does: the server is up, and
      we cannot know which of its paths would say more.

    So a proxied reply after a failure makes the upstream ready at once if its health path last
    said ready, but not if it said, say, 503 (model not loaded): a reply shows the server is
    up, not that the model is. Both proxy signals also start a probe at once, to confirm.
    """

    def __init__(
        self,
        url: str,
        *,
        interval: float,
        up: Gauge,
        lenient: bool = False,
    ) -> None:
        self._lenient = lenient
        self._pool: UpstreamPool | None = None
        self._url = url
        self._interval = interval
        self._timeout = min(interval, 5.0)  # for a whole probe: connect, redirects, every byte
        self._up = up
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # probe now, rather than when the interval is over
        self._answer = (False, "the health path has not answered yet")  # its last answer
        self._unreachable: str | None = None  # why not, while the last word is "unreachable"
        self._signals = 0  # proxy signals so far: tells a probe whether one came while it ran
        self._ready = False
        self.draining = False

    @property
    def status(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: shutting down"
        return self._upstream_status()

    def _upstream_status(self) -> tuple[bool, str]:
        if self._unreachable is not None:
            return False, self._unreachable
        return self._answer

    async def start(self) -> None:
        """Probe once (so readiness is known when serving starts), then keep probing."""
        # A pool of its own, not the proxy's: the probe's failures must not count as traffic's.
        target = urlsplit(self._url)
        tls = target.scheme == "https"
        self._pool = UpstreamPool(
            target.hostname or "127.0.0.1",
            target.port or (443 if tls else 80),
            tls=tls,
            connect_timeout=self._timeout,
            read_timeout=self._timeout,
        )
        await self.probe()
        self._task = asyncio.create_task(self._loop(), name="upstream-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pool is not None:
            await self._pool.close()

    async def probe(self) -> None:
        signals = self._signals
        unreachable = None
        try:
            async with asyncio.timeout(self._timeout):
                status = await self._get()
            ready = status < 500 if self._lenient else 200 <= status < 300
            self._answer = ready, f"{self._url} answered {status}"
        except (UpstreamError, TimeoutError) as exc:
            unreachable = f"{self._url} unreachable: {type(exc).__name__} {exc}".strip()
        # A proxy signal that came while the probe ran is fresher than what the probe's
        # connection saw; the signal also asked for the probe that follows this one.
        if signals == self._signals:
            self._unreachable = unreachable
        self._publish()

    async def _get(self) -> int:
        """GET the health URL, following redirects on the same host and port; the status of the
        last answer. Each body is read to its end, so that the connection can be reused."""
        assert self._pool is not None, "start() opens the pool"
        url = self._url
        for _ in range(MAX_REDIRECTS + 1):
            target = urlsplit(url)
            path = (target.path or "/") + (f"?{target.query}" if target.query else "")
            response = await self._pool.request("GET", path.encode(), _HEADERS, None)
            try:
                while await response.read():
                    pass
            finally:
                response.release()
            location = _location(response.raw_headers) if response.status in _REDIRECTS else None
            if location is None:
                break
            following = urljoin(url, location)
            if urlsplit(following)[:2] != target[:2]:
                break  # another host: its status is the answer
            url = following
        return response.status

    def upstream_failed(self, reason: str) -> None:
        """Not ready at once, as the proxy's traffic says; and probe."""
        self._signals += 1
        self._unreachable = f"proxy traffic: {reason}"
        self._publish()
        self._wake.set()

    def upstream_answered(self) -> None:
        """Reachable again: ready at once if the health path last said so; and probe, since a
        server that has just come back may not have loaded its model yet."""
        self._signals += 1
        self._unreachable = None
        self._publish()
        self._wake.set()

    def _publish(self) -> None:
        ready, reason = self._upstream_status()
        if ready != self._ready:
            self._ready = ready
            log.info("upstream readiness changed", extra={"ready": ready, "reason": reason})
        self._up.set(1 if ready else 0)

    async def _loop(self) -> None:
        """One probe at a time: a wake-up that comes while one runs starts the next at once,
        and any number of them start only that one."""
        while True:
            delay = self._interval if self._ready else min(self._interval, RECHECK)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            await self.probe()


def _location(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"location":
            return value.decode("latin-1")
    return None
