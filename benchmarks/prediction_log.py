"""Driver of benchmarks/prediction_log.sh: how many rows a second the PostgreSQL prediction log
takes through the store alone, and how long a join of 10,000 labels takes; then the CPU the log
costs a sidecar under load, with a SQLite file and with PostgreSQL, against no store. Uses PG_URL
(a scratch database: its sidecar_* tables are created and emptied), or a throwaway cluster
(tests/postgres.py) when it is unset.

    usage: prediction_log.py    (from prediction_log.sh, which starts the canned upstream)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.postgres: the throwaway cluster the tests use

import psycopg  # noqa: E402

from sidecar.feedback.postgres import PostgresStore  # noqa: E402
from sidecar.feedback.store import LoggedRow, NewLabel  # noqa: E402
from tests.postgres import running_cluster  # noqa: E402

ROWS = int(os.environ.get("ROWS", "1000000"))  # rows written through the store alone
BATCH = int(os.environ.get("BATCH", "500"))  # rows per COPY, about what the writer gets at 5k/s
LABELS = 10_000
DUR = os.environ.get("DUR", "10s")  # wrk's run through the sidecar
CONNECTIONS = int(os.environ.get("C", "32"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))  # of runs through sidecars; 0 skips them
SIDECAR = os.environ.get("SIDECAR", str(ROOT / ".venv/bin/sidecar"))
PORT = int(os.environ.get("PORT", "18005"))
UPSTREAM = "http://127.0.0.1:18001"  # the canned nginx iris model (common.sh)
STORES = ("none", "sqlite", "postgresql")
TICKS = os.sysconf("SC_CLK_TCK")


@contextmanager
def database() -> Iterator[str]:
    if os.environ.get("PG_URL"):
        yield os.environ["PG_URL"]
        return
    with running_cluster() as cluster, cluster.database() as url:
        yield url


def logged_rows(count: int, start: int) -> list[LoggedRow]:
    """Iris-like rows: 32-character request ids, four features as JSON, a class, a confidence."""
    rng = random.Random(start)
    return [
        LoggedRow(
            f"{start + index:032x}",
            0,
            time.time(),
            "iris",
            "1",
            rng.choice(("setosa", "versicolor", "virginica")),
            rng.random(),
            None,
            None,
            json.dumps({f"f{j}": round(rng.uniform(0, 8), 2) for j in range(4)}),
            1.5,
        )
        for index in range(count)
    ]


def store_alone(url: str) -> None:
    store = PostgresStore(url, max_rows=10 * ROWS, max_age_seconds=1e9)
    batches = [logged_rows(BATCH, start) for start in range(0, ROWS, BATCH)]
    began = time.perf_counter()
    for batch in batches:
        store.append(batch)
        store.evict(time.time())  # as the writer does after every batch
    seconds = time.perf_counter() - began
    print(
        f"store alone: {ROWS:,} rows in batches of {BATCH} (COPY + eviction check each) in "
        f"{seconds:.1f} s: {ROWS / seconds:,.0f} rows/s"
    )

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("ANALYZE sidecar_predictions")
    keys = [(f"{index:032x}", 0) for index in random.Random(1).sample(range(ROWS), LABELS)]
    began = time.perf_counter()
    with store.transaction():
        found = store.find(keys)
        store.set_labels([NewLabel(row, "setosa", None) for row in found.values()], time.time())
    seconds = time.perf_counter() - began
    print(
        f"join: {LABELS:,} labels against {store.rows:,} rows (find, lock, update) in "
        f"{seconds * 1000:.0f} ms; {len(found):,} matched"
    )
    store.close()


_COUNTS = re.compile(
    r"^(sidecar_prediction_log_written_total"
    r'|sidecar_dropped_observations_total\{reason="prediction_log_\w+"\}) (\S+)$'
)


def metrics(admin: int) -> dict[str, float]:
    """Rows written and rows dropped by the prediction log, from the admin port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics") as response:
        text = response.read().decode()
    return {m[1]: float(m[2]) for m in map(_COUNTS.match, text.splitlines()) if m}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, every thread of it (the log's writer too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def serve(store: str | None, port: int, scratch: Path) -> subprocess.Popen[bytes]:
    """`sidecar serve` on CPU 1 in front of the canned model, with this store or none."""
    config = scratch / f"sidecar-{port}.yaml"
    feedback = f"feedback:\n  store: {json.dumps(store)}\n" if store else ""
    config.write_text(f"upstream: {UPSTREAM}\nmodel_name: iris\npreset: kserve-v1\n{feedback}")
    listen = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(port + 1)]
    command = [SIDECAR, "serve", "--config", str(config), *listen, "--log-level", "warning"]
    return subprocess.Popen(["taskset", "-c", "1", *command])  # taskset execs: the same pid


def wrk(port: int, connections: int) -> tuple[int, float]:
    """Requests answered (all of them 2xx, or this fails) and the seconds they took."""
    target = f"http://127.0.0.1:{port}/v1/models/iris:predict"
    script = str(ROOT / "benchmarks/post.lua")
    command = ["wrk", "-t1", f"-c{connections}", f"-d{DUR}", "-s", script, target]
    out = subprocess.run(
        ["taskset", "-c", "0", *command], capture_output=True, text=True, check=True
    ).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)s", out)
    if done is None or "Non-2xx" in out or "Socket errors" in out:
        msg = f"wrk: not every request was answered 2xx:\n{out}"
        raise SystemExit(msg)
    return int(done[1]), float(done[2])


@dataclass(frozen=True)
class Run:
    """One wrk run through a sidecar with one store (or none)."""

    store: str
    answered: int
    seconds: float
    cpu: float  # the sidecar's CPU seconds: serving, and writing the rows of what it served
    written: float  # rows the log counted as written, and dropped
    dropped: float
    kept: int  # rows in the store once the sidecar stopped

    @property
    def rate(self) -> float:
        return self.answered / self.seconds

    @property
    def cpu_us(self) -> float:
        """CPU per request: what a saturated core's requests a second are the inverse of."""
        return self.cpu / self.answered * 1e6

    def line(self) -> str:
        return (
            f"{self.store:<10} {self.rate:>7,.0f} requests/s {self.cpu_us:5.1f} us CPU/request "
            f"({self.cpu / self.seconds:.0%} of CPU 1); {self.answered:,} answered, "
            f"{self.written:,.0f} rows logged, {self.dropped:,.0f} dropped, {self.kept:,} kept"
        )


def measure(stores: list[str], url: str) -> list[Run]:
    """wrk through a fresh sidecar for each store, all at once on CPU 1, the connections shared
    out: with a new SQLite file, the emptied PostgreSQL table, or no store."""
    ports = [PORT + 2 * index for index in range(len(stores))]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "predictions.db"
        location = {"none": None, "sqlite": str(path), "postgresql": url}
        if "postgresql" in stores:
            with psycopg.connect(url) as connection:
                connection.execute("TRUNCATE sidecar_predictions")
        sidecars = [
            serve(location[s], p, Path(scratch)) for s, p in zip(stores, ports, strict=True)
        ]
        try:
            before = [ready(port) for port in ports]
            cpu = [cpu_seconds(sidecar.pid) for sidecar in sidecars]
            with ThreadPoolExecutor(len(ports)) as pool:
                loads = list(pool.map(wrk, ports, [CONNECTIONS // len(ports)] * len(ports)))
            time.sleep(2)  # the writers empty their queues, on the CPU measured
            cpu = [
                cpu_seconds(sidecar.pid) - used for sidecar, used in zip(sidecars, cpu, strict=True)
            ]
            after = [metrics(port + 1) for port in ports]
        finally:
            for sidecar in sidecars:
                sidecar.terminate()
                sidecar.wait()
        runs = []
        for store, load, used, first, last in zip(stores, loads, cpu, before, after, strict=True):
            change = {key: value - first.get(key, 0.0) for key, value in last.items()}
            written = change.pop("sidecar_prediction_log_written_total", 0.0)
            dropped = sum(change.values())
            runs.append(Run(store, *load, used, written, dropped, kept(store, path, url)))
    return runs


def ready(port: int) -> dict[str, float]:
    """The log's counters, once the sidecar on this port answers."""
    for _ in range(100):
        try:
            return metrics(port + 1)
        except OSError:
            time.sleep(0.1)
    return metrics(port + 1)


def kept(store: str, path: Path, url: str) -> int:
    """Rows in the store, once its sidecar has stopped."""
    if store == "sqlite":
        with contextlib.closing(sqlite3.connect(path)) as connection:
            return int(connection.execute("SELECT count(*) FROM predictions").fetchone()[0])
    if store == "postgresql":
        with psycopg.connect(url) as connection:
            found = connection.execute("SELECT count(*) FROM sidecar_predictions").fetchone()
            return int(found[0]) if found else 0
    return 0


def rotated(stores: tuple[str, ...], by: int) -> list[str]:
    return [*stores[by % len(stores) :], *stores[: by % len(stores)]]


def through_a_sidecar(url: str) -> None:
    """ROUNDS rounds, each with a run of every store alone on CPU 1 (the issue's measure: 1 core
    over the requests a second) and, side by side on CPU 1, a sidecar with each store and one
    without. A store's cost is its ratio to no store within each round (the runs of a round are
    minutes apart at most), and the median of those. Stores take turns in another order each
    round, so that a noisy neighbour weighs on them alike; side by side, both sidecars see the
    same neighbours at the same time, so their ratio holds still where runs one after the other
    vary by 10% and more."""
    PostgresStore(url, max_rows=1, max_age_seconds=1).close()  # the tables, if ROWS=0 made none
    alone: list[dict[str, Run]] = []
    side: list[dict[str, Run]] = []
    for round_ in range(ROUNDS):
        alone.append({})
        for store in rotated(STORES, round_):
            (done,) = measure([store], url)
            alone[-1][store] = done
            print(f"  round {round_ + 1}, alone:        {done.line()}", flush=True)
        side.append({})
        for store in rotated(STORES[1:], round_):
            # Which sidecar is started first, and gets the lower port, alternates.
            pair = ["none", store] if round_ % 2 else [store, "none"]
            both = {run.store: run for run in measure(pair, url)}
            side[-1][store], side[-1][f"none beside {store}"] = both[store], both["none"]
            for run in both.values():
                print(f"  round {round_ + 1}, side by side: {run.line()}", flush=True)
    print(
        f"through a sidecar (CPU 1; wrk, nginx and PostgreSQL on CPU 0; {CONNECTIONS} "
        f"connections, {DUR} a run), medians of {ROUNDS} rounds. A store's cost per request "
        "against none: alone, as 1 core / (requests/s) and as CPU time / requests; side by side, "
        "as CPU time / requests:"
    )
    print(
        f"  {'store':<10} {'requests/s':>10} {'us CPU/req':>10} {'x by req/s':>10} "
        f"{'x by CPU':>8} {'x side by side':>14} {'logged rows/s':>13} {'dropped':>7}"
    )
    for store in STORES:
        runs = [found[store] for found in alone]
        by_rate = [found["none"].rate / found[store].rate for found in alone]
        by_cpu = [found[store].cpu_us / found["none"].cpu_us for found in alone]
        beside = [
            found[store].cpu_us / found[f"none beside {store}"].cpu_us
            for found in side
            if store in found
        ]
        dropped = sum(found[store].dropped for found in alone + side if store in found)
        print(
            f"  {store:<10} {statistics.median(run.rate for run in runs):>10,.0f} "
            f"{statistics.median(run.cpu_us for run in runs):>10.1f} "
            f"{statistics.median(by_rate):>9.2f}x {statistics.median(by_cpu):>7.2f}x "
            f"{statistics.median(beside or [1.0]):>13.2f}x "
            f"{statistics.median(run.written / run.seconds for run in runs):>13,.0f} "
            f"{dropped:>7,.0f}"
        )


@contextmanager
def on_cpu(cpu: int) -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def main() -> None:
    # The throwaway cluster inherits CPU 0, beside wrk and nginx, away from the sidecar's CPU 1.
    os.sched_setaffinity(0, {0})
    with database() as url:
        if ROWS:
            with on_cpu(1):  # the store's client on a core of its own, as the writer has
                store_alone(url)
        if ROUNDS:
            through_a_sidecar(url)


if __name__ == "__main__":
    main()
