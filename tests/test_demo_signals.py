"""`sidecar demo` stops on SIGTERM and SIGINT, and nothing it starts outlives it, even SIGKILL.

Each test runs the real command line (`python -m sidecar demo`) in a temporary directory, waits
until it serves, notes every process below it, signals it, and waits until all of them are gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="reads /proc; PR_SET_PDEATHSIG is Linux's"
)

# The MLServer venv (installed on first use): pytest finds a fixture by its name in the module.

# Safety nets against a hang, not performance bounds.
START_DEADLINE = 120.0  # MLServer trains its model and loads it first
EXIT_DEADLINE = 60.0  # MLServer gets 10 s to stop on SIGTERM before it is killed
SERVING = "Ctrl-C to stop."  # the demo's last line once its traffic went through

# A process as pid and start time (clock ticks since boot), so a reused pid is not taken for ours.
Proc = tuple[int, str]


def _stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of /proc/PID/stat (state first), or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2, the command name, may hold spaces and parentheses; the rest follows its last ")".
    return text[text.rindex(")") + 2 :].split()


def alive(proc: Proc) -> bool:
    """True while this very process runs (a zombie has exited: it only waits to be reaped)."""
    stat = _stat(proc[0])
    return stat is not None and stat[19] == proc[1] and stat[0] != "Z"


def descendants(pid: int) -> set[Proc]:
    """Every process below `pid`: children, their children, and so on."""
    found: set[Proc] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                pids = [int(child) for child in children.read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue  # that thread or process ended while we looked
            for child in pids:
                stat = _stat(child)
                if stat is not None:
                    found.add((child, stat[19]))
                    pending.append(child)
    return found


def mentioning(directory: Path) -> set[Proc]:
    """Every process whose command line names something under `directory`.

    Children of a demo that already exited have left its tree, but the demo's children all
    name its working directory (MLServer its model repository, training the model file).
    """
    needle = os.fsencode(directory)
    found: set[Proc] = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            named = needle in cmdline.read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended while we looked
        stat = _stat(int(cmdline.parent.name))
        if named and stat is not None:
            found.add((int(cmdline.parent.name), stat[19]))
    return found


async def until(check: Callable[[], bool], deadline: float) -> bool:
    """Poll `check` until it holds (True) or `deadline` seconds have passed (False)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not check():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.05)
    return True


async def gone(procs: set[Proc]) -> None:
    """Return once none of `procs` runs; fail naming the survivors after EXIT_DEADLINE."""
    if not await until(lambda: not any(alive(proc) for proc in procs), EXIT_DEADLINE):
        survivors = sorted(pid for pid, _ in filter(alive, procs))
        pytest.fail(f"still running {EXIT_DEADLINE:.0f} s after the signal: pids {survivors}")


@dataclass
class Demo:
    """A running `sidecar demo`: its process, what it printed so far, and every child seen."""

    process: asyncio.subprocess.Process
    workdir: Path
    output: list[str] = field(default_factory=list)
    seen: set[Proc] = field(default_factory=set)

    async def read_until(self, text: str) -> None:
        """Read its output until a line holds `text`; fail if it exits or START_DEADLINE passes."""
        assert self.process.stdout is not None
        async with asyncio.timeout(START_DEADLINE):
            while not self.output or text not in self.output[-1]:
                line = await self.process.stdout.readline()
                if not line:
                    pytest.fail(f"the demo exited before printing {text!r}:\n{self.printed}")
                self.output.append(line.decode(errors="replace"))

    def children(self) -> set[Proc]:
        """The processes below the demo now; each is also remembered for the clean-up."""
        now = descendants(self.process.pid)
        self.seen |= now
        return now

    async def exit_code(self) -> int:
        """Wait (bounded) for the demo itself to exit."""
        async with asyncio.timeout(EXIT_DEADLINE):
            return await self.process.wait()

    @property
    def printed(self) -> str:
        return "".join(self.output)

    def url(self, label: str) -> str:
        """The URL the demo printed on its `label` line, e.g. "sidecar metrics"."""
        (line,) = (line for line in self.output if line.startswith(label))
        return line.split()[len(label.split())].removesuffix("/metrics")


RunDemo = Callable[..., Awaitable[Demo]]


@pytest.fixture
async def run_demo(tmp_path: Path) -> AsyncIterator[RunDemo]:
    """Start `python -m sidecar demo` with extra arguments; kill whatever is left at the end.

    The clean-up matters most when a test fails: a child orphaned by the demo would otherwise
    run on after the test session.
    """
    started: list[Demo] = []

    async def run(*args: str) -> Demo:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "demo",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--requests",
            "1",
            *args,
            cwd=tmp_path,  # MLServer's model repository goes under ./.demo
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        started.append(Demo(process, tmp_path))
        return started[-1]

    yield run
    for demo in started:
        if demo.process.returncode is None:
            demo.process.kill()
        for pid, _ in filter(alive, demo.seen | mentioning(demo.workdir)):
            os.kill(pid, signal.SIGKILL)
        # Read to the end: the pipe closes once no process holds it (a child may inherit it).
        async with asyncio.timeout(EXIT_DEADLINE):
            await demo.process.communicate()


async def serving(run_demo: RunDemo, *args: str) -> Demo:
    """A demo that printed its closing lines and answers on its admin port."""
    demo = await run_demo(*args)
    await demo.read_until(SERVING)
    async with (
        aiohttp.ClientSession() as session,
        session.get(demo.url("sidecar metrics") + "/healthz") as response,
    ):
        assert response.status == 200, demo.printed
    return demo


async def assert_stops_cleanly(demo: Demo, signum: signal.Signals) -> None:
    """`signum` ends the demo with exit code 0, and every process it started ends too."""
    children = demo.children()
    demo.process.send_signal(signum)
    assert await demo.exit_code() == 0, demo.printed
    await gone(children | mentioning(demo.workdir))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_toy_demo_exits_0_on_signal(run_demo: RunDemo, signum: signal.Signals) -> None:
    """SIGTERM (`kill`) and SIGINT (Ctrl-C) both stop the toy-model demo cleanly, with code 0."""
    await assert_stops_cleanly(await serving(run_demo), signum)


async def test_child_is_terminated_when_its_parent_is_killed() -> None:
    """A child started with die_with_parent() gets SIGTERM when its parent dies of SIGKILL."""
    parent_script = (
        "import subprocess, sys\n"
        "from sidecar.children import die_with_parent\n"
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
        "child = subprocess.Popen(sleeper, preexec_fn=die_with_parent())\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.read()\n"  # until the test kills it
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        parent_script,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        async with asyncio.timeout(START_DEADLINE):
            line = await parent.stdout.readline()
        children = descendants(parent.pid)
        assert [pid for pid, _ in children] == [int(line)]
        parent.kill()
        await parent.wait()
        await gone(children)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()


@pytest.mark.slow
# The first test may pay for installing MLServer: a safety net, not a performance bound.
@pytest.mark.timeout(900)
class TestMLServerDemo:
    """The demo with a real MLServer below it, and the training run before that."""

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
    async def test_signal_stops_mlserver_and_exits_0(
        self, run_demo: RunDemo, mlserver_bin: Path, signum: signal.Signals
    ) -> None:
        """SIGTERM or SIGINT to the demo stops MLServer too, and the demo exits 0."""
        demo = await serving(run_demo, "--mlserver", str(mlserver_bin))
        assert demo.children(), f"no MLServer below the demo:\n{demo.printed}"
        await assert_stops_cleanly(demo, signum)

    async def test_signal_during_start_up_stops_the_child_at_work(
        self, run_demo: RunDemo, mlserver_bin: Path
    ) -> None:
        """SIGTERM while the model trains or MLServer loads stops that child too."""
        demo = await run_demo("--mlserver", str(mlserver_bin))
        await demo.read_until("starting MLServer")
        assert await until(lambda: bool(demo.children()), START_DEADLINE), demo.printed
        await assert_stops_cleanly(demo, signal.SIGTERM)

    async def test_sigkill_of_the_demo_still_ends_mlserver(
        self, run_demo: RunDemo, mlserver_bin: Path
    ) -> None:
        """Killed outright, the demo cannot clean up: MLServer ends anyway (PR_SET_PDEATHSIG)."""
        demo = await serving(run_demo, "--mlserver", str(mlserver_bin))
        children = demo.children()
        assert children, f"no MLServer below the demo:\n{demo.printed}"
        demo.process.kill()
        assert await demo.exit_code() == -signal.SIGKILL
        await gone(children | mentioning(demo.workdir))
