"""Child processes that never outlive us: tied to our life on Linux, stopped as a whole group."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Final

__all__ = ["die_with_parent", "stop_group"]

_PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>


def die_with_parent(signum: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send the child `signum` when we die, even of SIGKILL.

    Call it in the parent, just before spawning; it returns None where there is no prctl (not
    Linux), and preexec_fn=None is what subprocess and asyncio take for "nothing to run":

        await asyncio.create_subprocess_exec(*argv, preexec_fn=die_with_parent())

    The kernel watches the thread that spawned the child, not the process: spawn from the
    thread that lives as long as we do (the event loop's), never from a worker thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # a libc without prctl
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    # Looked up here, in the parent: between fork and exec the child should only make the call.
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signum))
        # If we died between fork and prctl the signal will never come: the child was already
        # handed to another parent (init or a subreaper), so it must not start at all.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


async def stop_group(process: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM the process group `process` leads, then SIGKILL it if the leader has not exited
    within `grace` seconds. The child must have been started with start_new_session=True."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            continue
        # The leader is gone; a worker it left behind in the group gets no grace.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return
