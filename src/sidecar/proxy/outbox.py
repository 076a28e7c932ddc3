"""Writes held until the event loop's turn ends, then made one after another.

A whole reply, or a whole request to the upstream, is written from the protocol callback that
completed it. Made there, at once, the writes of one turn are spread out between the reads
and parsing of the others, and each can find its peer (the upstream, the client) asleep again:
waking a process on another CPU costs the kernel more than the write itself. Held to the end of
the turn, they go out together, and a peer woken by the first finds the others waiting: in
benchmarks/throughput.sh's setup, about a fifth less CPU per request than writing each at once.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["Holder", "Outbox"]


class Holder(Protocol):
    """A connection with bytes held for the end of the turn."""

    def flush(self) -> None:
        """Write what is held now."""


class Outbox:
    """The connections of one event loop that hold bytes; each is flushed once per turn."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: list[Holder] = []

    def hold(self, holder: Holder) -> None:
        """`holder` has started holding bytes: flush it when this turn's callbacks are done."""
        if not self._held:
            asyncio.get_running_loop().call_soon(self._flush)
        self._held.append(holder)

    def _flush(self) -> None:
        held, self._held = self._held, []
        for holder in held:
            holder.flush()
