"""What each worker's proxy traffic says of the upstream, relayed to the supervisor's probe: one
Unix datagram per change, so that /readyz follows every worker's traffic at once."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

from sidecar.logs import RateLimitedLog
from sidecar.proxy.pool import UpstreamHealth

__all__ = ["HEALTH_SOCKET", "HealthInbox", "HealthRelay"]

log = logging.getLogger(__name__)

HEALTH_SOCKET = "health.sock"  # workers' word on the upstream, for the supervisor's probe
_FAILED, _ANSWERED = b"F", b"A"  # a health datagram: one of these (_FAILED then the reason)
_MAX_DATAGRAM = 4096  # a reason is a line of text; anything longer is cut


class HealthInbox:
    """The supervisor's end of the workers' health relays: a Unix datagram socket at `path`;
    what each message says goes to `health` (the probe) as it arrives."""

    def __init__(self, path: Path, health: UpstreamHealth) -> None:
        self._health = health
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._socket.bind(str(path))
        except OSError:
            self._socket.close()
            raise
        self._socket.setblocking(False)
        # A reader, not create_datagram_endpoint: uvloop's takes no AF_UNIX address.
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._socket.fileno(), self._receive)

    def _receive(self) -> None:
        while True:
            try:
                message = self._socket.recv(_MAX_DATAGRAM)
            except BlockingIOError:
                return
            if message == _ANSWERED:
                self._health.upstream_answered()
            elif message.startswith(_FAILED):
                self._health.upstream_failed(message[1:].decode(errors="replace"))

    def close(self) -> None:
        self._loop.remove_reader(self._socket.fileno())
        self._socket.close()


class HealthRelay:
    """A worker's UpstreamHealth: each change its pool reports goes to the supervisor's
    HealthInbox at `path` as one datagram, so /readyz follows every worker's traffic at once.

    Sending never waits (the pool calls from the event loop): a message the supervisor cannot
    take now is dropped, and its probe still finds out, within health_interval at worst."""

    def __init__(self, path: Path) -> None:
        self._path = str(path)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._complaints = RateLimitedLog(log)

    def upstream_failed(self, reason: str) -> None:
        self._send(_FAILED + reason.encode())

    def upstream_answered(self) -> None:
        self._send(_ANSWERED)

    def close(self) -> None:
        self._socket.close()

    def _send(self, message: bytes) -> None:
        try:
            self._socket.sendto(message, self._path)
        except OSError as exc:  # its queue is full, or it is gone (then _tick stops us)
            self._complaints.warning(
                "health relay", "the supervisor missed news of the upstream", error=str(exc)
            )
