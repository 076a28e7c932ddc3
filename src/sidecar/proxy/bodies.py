"""A message body between the parser that feeds it and the one task that reads it.

The relay has one each way: a request body still arriving from the client (http1.BodyReader)
and an upstream reply (pool.UpstreamResponse). llhttp's callbacks feed the chunks as they come;
the reader takes whatever has piled up. Reading from the socket pauses while more than
HIGH_WATER bytes wait here unread, and resumes once the reader has taken them: a slow receiver
must not make us hold a fast sender's whole body.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Protocol

__all__ = ["HIGH_WATER", "BodyBuffer", "Flow"]

HIGH_WATER = 1024 * 1024


class Flow(Protocol):
    """The connection a body arrives on."""

    def body_full(self) -> None:
        """Stop reading from the socket."""

    def body_drained(self) -> None:
        """Read from the socket again."""


class _Over:
    """The flow of a body that is over (read to its end, or failed): nothing is left to pause or
    resume. Put in the connection's place, it ends the cycle between the connection and this
    body, so that both go by reference count once the connection is dropped."""

    def body_full(self) -> None:
        pass

    def body_drained(self) -> None:
        pass


_OVER = _Over()


class BodyBuffer:
    """Body chunks fed by a parser, read by one task (see the module's docstring)."""

    __slots__ = ("_chunks", "_done", "_error", "_flow", "_paused", "_size", "_waiter")

    def __init__(self, flow: Flow) -> None:
        self._flow: Flow = flow
        self._chunks: list[bytes] = []
        self._size = 0
        self._paused = False
        self._done = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may not have been read yet)."""
        return self._done

    def at_eof(self) -> bool:
        """The whole body has arrived and been read."""
        return self._done and not self._chunks

    async def read(self) -> bytes:
        """The bytes that have arrived (waiting for some), or b"" once the body is over."""
        while (chunk := self.read_nowait()) is None:
            await self._wait()
        return chunk

    def read_nowait(self) -> bytes | None:
        """Like read(), but None instead of waiting: a body that came whole costs no await."""
        if not self._chunks:
            if self._error is not None:
                # A copy: raised, an error takes a traceback whose frames refer to this buffer
                # and its connection. Kept here, it would make them a cycle that only the cyclic
                # collector frees (memory.py says how rarely that runs), body chunks included.
                raise copy.copy(self._error)
            return b"" if self._done else None
        chunk = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        self._size = 0
        if self._paused:
            self._paused = False
            self._flow.body_drained()
        if self._done:
            self._flow = _OVER
        return chunk

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # Fed by the connection as llhttp parses.

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > HIGH_WATER and not self._paused:
            self._paused = True
            self._flow.body_full()
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, error: Exception) -> None:
        """The body ends with `error`, which read() raises once what arrived before is read."""
        if not self._done:
            self._error = error
        self._flow = _OVER
        self._wake()
