"""A throwaway PostgreSQL cluster for the tests: initdb and pg_ctl from Debian's `postgresql`
package (scripts/test installs it), in a temporary directory, on a free port of 127.0.0.1 with its
unix socket in that directory. Nothing is mocked: the sidecar talks to a real server over TCP.

initdb refuses to run as root, and the tests run as root on CI: then the cluster belongs to the
`postgres` user that the package creates, and its commands run through `runuser`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

__all__ = ["PostgresCluster", "running_cluster"]

SUPERUSER = "sidecar"
START_ATTEMPTS = 5  # a free port can be taken by someone else before the server binds it


def postgres_bin(name: str) -> str:
    """initdb or pg_ctl: from PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which(name)
    if found is not None:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    if not candidates:
        msg = f"{name} not found: install Debian's postgresql (./scripts/test does)"
        raise FileNotFoundError(msg)
    return max(candidates, key=lambda path: int(Path(path).parts[-3].split(".")[0]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresCluster:
    """One cluster in `directory`; `start`, `stop` and `url` for fresh databases."""

    directory: Path
    port: int = 0

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        if os.geteuid() == 0:
            command = ("runuser", "-u", "postgres", "--", *command)
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)

    def _checked(self, *command: str) -> None:
        done = self._run(*command)
        if done.returncode != 0:
            msg = f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
            raise RuntimeError(msg)

    def init(self) -> None:
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
        self._checked(
            postgres_bin("initdb"),
            *("-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8"),
        )

    def start(self) -> None:
        """Start on a free port (the same one again after a stop); waits until it accepts."""
        for _ in range(START_ATTEMPTS):
            port = self.port or _free_port()
            # fsync off: a test cluster need not survive a power cut, and it is much faster.
            options = f"-p {port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
            started = self._run(
                postgres_bin("pg_ctl"),
                *("-D", str(self.data), "-l", str(self.directory / "log"), "-o", options),
                *("-w", "-t", "30", "start"),
            )
            if started.returncode == 0:
                self.port = port
                return
        log = (self.directory / "log").read_text(errors="replace")[-3000:]
        msg = f"pg_ctl start failed:\n{started.stdout}\n{started.stderr}\n{log}"
        raise RuntimeError(msg)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `immediate` is a crash as far as its clients can tell."""
        self._checked(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @contextmanager
    def database(self) -> Iterator[str]:
        """A new empty database for one test, dropped after it: its URL."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            with psycopg.connect(self.url(), autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def running_cluster() -> Iterator[PostgresCluster]:
    """A new cluster, started; stopped and removed at the end."""
    # Not under pytest's tmp_path: its directories are private to root, and the server may run
    # as the postgres user. A directory of its own under /tmp, owned by whoever runs the server.
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="sidecar-pg-")))
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if (cluster.data / "postmaster.pid").exists():
            cluster.stop("immediate")
        shutil.rmtree(cluster.directory, ignore_errors=True)
