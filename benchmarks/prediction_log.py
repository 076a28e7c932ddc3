"""Driver of benchmarks/prediction_log.sh: how many rows a second the PostgreSQL prediction log
takes, through the store alone and through a sidecar under load, and how long a join of 10,000
labels takes. Uses PG_URL (a scratch database: its sidecar_* tables are created and emptied), or
a throwaway cluster (tests/postgres.py) when it is unset.

    usage: prediction_log.py    (from prediction_log.sh, which starts the canned upstream)
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
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
CONNECTIONS = os.environ.get("C", "32")
SIDECAR = os.environ.get("SIDECAR", str(ROOT / ".venv/bin/sidecar"))
PORT = int(os.environ.get("PORT", "18005"))
UPSTREAM = "http://127.0.0.1:18001"  # the canned nginx iris model (common.sh)


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


def serve(store: str | None) -> subprocess.Popen[bytes]:
    """`sidecar serve` on CPU 1 in front of the canned model, with this store or none."""
    config = Path(tempfile.mkdtemp()) / "sidecar.yaml"
    feedback = f"feedback:\n  store: {json.dumps(store)}\n" if store else ""
    config.write_text(f"upstream: {UPSTREAM}\nmodel_name: iris\npreset: kserve-v1\n{feedback}")
    listen = ["--host", "127.0.0.1", "--port", str(PORT), "--metrics-port", str(PORT + 1)]
    command = [SIDECAR, "serve", "--config", str(config), *listen, "--log-level", "warning"]
    return subprocess.Popen(["taskset", "-c", "1", *command])


def wrk() -> tuple[int, float]:
    """Requests answered (all of them 2xx, or this fails) and the seconds they took."""
    target = f"http://127.0.0.1:{PORT}/v1/models/iris:predict"
    script = str(ROOT / "benchmarks/post.lua")
    command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DUR}", "-s", script, target]
    out = subprocess.run(
        ["taskset", "-c", "0", *command], capture_output=True, text=True, check=True
    ).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)s", out)
    if done is None or "Non-2xx" in out or "Socket errors" in out:
        msg = f"wrk: not every request was answered 2xx:\n{out}"
        raise SystemExit(msg)
    return int(done[1]), float(done[2])


def through_a_sidecar(url: str) -> None:
    """The same load on a sidecar without a store, then with the PostgreSQL one."""
    results = {}
    for store in (None, url):
        sidecar = serve(store)
        try:
            for _ in range(100):
                try:
                    before = metrics(PORT + 1)
                    break
                except OSError:
                    time.sleep(0.1)
            answered, seconds = wrk()
            time.sleep(2)  # the writer empties its queue
            after = metrics(PORT + 1)
        finally:
            sidecar.terminate()
            sidecar.wait()
        results[store] = answered / seconds
    name = "sidecar_prediction_log_written_total"
    written = after[name] - before.get(name, 0.0)
    drops = {key.split('"')[1]: value for key, value in after.items() if "dropped" in key}
    with psycopg.connect(url) as connection:
        stored = connection.execute("SELECT count(*) FROM sidecar_predictions").fetchone()
    print(
        f"through a sidecar (CPU 1; wrk, nginx and PostgreSQL on CPU 0; {CONNECTIONS} "
        f"connections, {DUR}): without a store {results[None]:,.0f} requests/s; with PostgreSQL "
        f"{results[url]:,.0f} requests/s, {answered:,} answered (all 2xx), {written:,.0f} rows "
        f"logged: {written / seconds:,.0f} logged rows/s; rows in the table "
        f"{stored[0] if stored else 0:,}; dropped {drops}"
    )


def main() -> None:
    with database() as url:
        store_alone(url)
        with psycopg.connect(url) as connection:
            connection.execute("TRUNCATE sidecar_predictions")
        through_a_sidecar(url)


if __name__ == "__main__":
    main()
