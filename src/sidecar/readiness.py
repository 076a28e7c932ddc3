"""Is the upstream ready? A periodic probe of its health path, read by /readyz and a gauge."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from prometheus_client import Gauge

log = logging.getLogger(__name__)


class UpstreamProbe:
    """Polls `GET upstream + health_path`; 2xx means ready. Draining overrides everything.

    With no health path configured (`lenient`), any answer below 500 counts: the server is up,
    and we cannot know which of its paths would say more.
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
        self._session: aiohttp.ClientSession | None = None
        self._url = url
        self._interval = interval
        self._timeout = aiohttp.ClientTimeout(total=min(interval, 5.0))
        self._up = up
        self._task: asyncio.Task[None] | None = None
        self.ready = False
        self.reason = "not probed yet"
        self.draining = False

    @property
    def status(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: shutting down"
        return self.ready, self.reason

    async def start(self) -> None:
        """Probe once (so readiness is known when serving starts), then keep probing."""
        self._session = aiohttp.ClientSession()
        await self.probe()
        self._task = asyncio.create_task(self._loop(), name="upstream-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def probe(self) -> None:
        assert self._session is not None, "start() opens the session"
        try:
            async with self._session.get(self._url, timeout=self._timeout) as response:
                await response.read()
                ready = response.status < 500 if self._lenient else 200 <= response.status < 300
                reason = f"{self._url} answered {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ready, reason = False, f"{self._url} unreachable: {type(exc).__name__} {exc}".strip()
        if ready != self.ready:
            log.info("upstream readiness changed", extra={"ready": ready, "reason": reason})
        self.ready, self.reason = ready, reason
        self._up.set(1 if ready else 0)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.probe()
