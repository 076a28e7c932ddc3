"""The figures docs/ground-truth.md gives about the SQLite prediction log, the CloudEvents sink and
CBPE, printed by the code that serves them. (Its PostgreSQL figures: benchmarks/prediction_log.sh.)

    python benchmarks/ground_truth_figures.py              # every section (about a minute)
    python benchmarks/ground_truth_figures.py sqlite sink  # some of them

Sections:

- `sqlite`: the store's size and speed. ROWS iris rows (default 1,000,000, the default
  `max_rows`), one-row requests as the recorder hands them over (four features, a class name and
  its confidence, 32-character request ids from the proxy's own generator), handed over by the
  event loop DRAIN (32) requests a drain, are written as the writer thread writes them:
  sidecar.feedback.log.expand_batch makes the rows of each drain (features to JSON), then
  SQLiteStore.append (one transaction) and .evict, in batches of BATCH rows (1,000), the process
  on one CPU. Prints bytes per row (the file and its WAL over the rows) and rows per second, for
  the store's part (append + evict) and the writer's whole (expand too); then the same with the
  store full (every batch also evicts as many rows), and per batch size for SECONDS (2) each.
- `sink`: a PredictionSink (default settings) sends EVENTS events (20,000: one iris row each,
  features included) to an aiohttp receiver in another process. The receiver runs on CPU 0 and
  the sink on CPU 1 when there are two. Prints events per second, the CPU time of the sink's
  thread per event, and an event's size; then how long the defaults take to give up on a
  receiver that refuses connections.
- `cbpe`: the estimate (ml_expected_correct_total / ml_expected_correct_rows_total, from a
  FeedbackRecorder) against the true accuracy, on the 10,000 synthetic rows of
  tests/test_feedback_quality.py: calibrated, and sharpened (p**4, renormalised).

Timings vary from run to run (a shared machine); the `cbpe` figures do not (fixed seeds). Loopback
only; nothing is left behind (a temporary directory, a child process).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from sidecar.config import Config
from sidecar.demo.mlserver import iris_rows
from sidecar.extract.predictions import ClassNames, read_probabilities
from sidecar.extract.types import Extraction, FeatureTable
from sidecar.feedback.cloudevents import PredictionSink
from sidecar.feedback.log import PredictionBatch, expand_batch
from sidecar.feedback.recorder import FeedbackRecorder
from sidecar.feedback.settings import FeedbackSettings
from sidecar.feedback.sqlite import SQLiteStore
from sidecar.proxy.headers import new_request_id
from sidecar.recorders.labels import OverflowCounter

ROWS = int(os.environ.get("ROWS", "1000000"))
BATCH = int(os.environ.get("BATCH", "1000"))
SECONDS = float(os.environ.get("SECONDS", "2"))
EVENTS = int(os.environ.get("EVENTS", "20000"))
DRAIN = int(os.environ.get("DRAIN", "32"))
IRIS = ClassNames(("setosa", "versicolor", "virginica"))
POSITIONS = ("0", "1", "2", "3")  # a KServe V1 `instances` row's columns, as extracted
NAMED = ("sepal_length", "sepal_width", "petal_length", "petal_width")


# --- iris predictions, as the recorder hands them to the writer and the sink -------------------


def iris_batch(rng: random.Random, count: int, columns: tuple[str, ...]) -> list[PredictionBatch]:
    """`count` one-row requests to the iris model, as the event loop hands them to the writer:
    one PredictionBatch per drain of DRAIN requests read as one. Features with one decimal, the
    probabilities of a fairly sure classifier, one request id each from the proxy's generator."""
    features = np.array(iris_rows(rng, count), dtype=np.float64)
    gen = np.random.default_rng(rng.randrange(2**32))
    probabilities = gen.dirichlet([8.0, 1.0, 1.0], size=count)
    outputs = read_probabilities(probabilities, IRIS)
    no = np.zeros(features.shape, dtype=bool)
    table = FeatureTable(columns, features, no, no)
    now = time.time()
    drains = []
    for start in range(0, count, DRAIN):
        stop = min(start + DRAIN, count)
        drains.append(
            PredictionBatch(
                now,
                ("iris", "1"),
                outputs.rows(start, stop),
                table.rows(start, stop),
                [new_request_id() for _ in range(start, stop)],
                [1.5] * (stop - start),
                list(range(stop - start)),
                [1] * (stop - start),
            )
        )
    return drains


@contextmanager
def on_cpu(cpu: int) -> Iterator[None]:
    """Run this process on one CPU (the last one when there are fewer), then as before."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpu, (os.cpu_count() or 1) - 1)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --- sqlite --------------------------------------------------------------------------------------


def file_bytes(path: Path) -> int:
    """The database file and its WAL."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


class Writer:
    """What the writer thread does with each batch (log.PredictionLog._write and _store, without
    the counters), timed in two parts: the rows made from the predictions (expand: features to
    JSON), and the store's part (one transaction of inserts, then the bounds)."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.rows = 0
        self.expanding = 0.0
        self.storing = 0.0

    def write(self, batch: list[PredictionBatch]) -> None:
        began = time.perf_counter()
        rows = [row for drain in batch for row in expand_batch(drain, features=True, segment=None)]
        expanded = time.perf_counter()
        self.store.append(rows)
        self.store.evict(time.time())
        self.storing += time.perf_counter() - expanded
        self.expanding += expanded - began
        self.rows += len(rows)

    def rates(self) -> str:
        return (
            f"the store (append + evict) {self.rows / self.storing:,.0f} rows/s, the writer "
            f"(expand + append + evict) {self.rows / (self.storing + self.expanding):,.0f} rows/s"
        )


def sqlite_figures() -> None:
    defaults = FeedbackSettings()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as scratch, on_cpu(1):
        path = Path(scratch) / "predictions.db"
        store = SQLiteStore(str(path), max_rows=ROWS, max_age_seconds=defaults.max_age_seconds)
        writer = Writer(store)
        for start in range(0, ROWS, BATCH):
            writer.write(iris_batch(rng, min(BATCH, ROWS - start), POSITIONS))
        size = file_bytes(path)
        print(
            f"sqlite: {store.rows:,} iris rows (4 features, 32-character request ids), file and "
            f"WAL {size / 1e6:,.0f} MB: {size / store.rows:.0f} bytes a row; in batches of "
            f"{BATCH:,} on one CPU: {writer.rates()}"
        )
        # Full: every batch now evicts as many rows as it adds, as a log at max_rows does.
        writer = Writer(store)
        while writer.storing + writer.expanding < SECONDS:
            writer.write(iris_batch(rng, BATCH, POSITIONS))
        size = file_bytes(path)
        print(
            f"sqlite, full ({store.rows:,} rows, each batch evicting as many), file and WAL "
            f"{size / 1e6:,.0f} MB: {size / store.rows:.0f} bytes a row; {writer.rates()}"
        )
        store.close()
        for rows in (10, 100, 1_000, 10_000):
            store = SQLiteStore(
                str(Path(scratch) / f"{rows}.db"), max_rows=ROWS, max_age_seconds=1e9
            )
            writer = Writer(store)
            while writer.storing + writer.expanding < SECONDS:
                writer.write(iris_batch(rng, rows, POSITIONS))
            store.close()
            print(f"sqlite, batches of {rows:,} rows into a new file: {writer.rates()}")


# --- sink ----------------------------------------------------------------------------------------


def receiver() -> None:
    """The child: an aiohttp receiver on a free loopback port (printed), 200 to every POST."""
    from aiohttp import web

    async def take(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", take)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


@contextmanager
def running_receiver() -> Iterator[str]:
    command = [sys.executable, __file__, "_receiver"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        os.sched_setaffinity(child.pid, {0})
        assert child.stdout is not None
        port = int(child.stdout.readline())
        yield f"http://127.0.0.1:{port}/models/default"
    finally:
        child.terminate()
        child.wait()


def counted(registry: CollectorRegistry, outcome: str) -> float:
    found = registry.get_sample_value("sidecar_prediction_sink_events_total", {"outcome": outcome})
    return found or 0.0


def new_sink(url: str, settings: FeedbackSettings) -> tuple[PredictionSink, CollectorRegistry]:
    registry = CollectorRegistry()
    dropped = Counter("sidecar_dropped_observations_total", "drops", ["reason"], registry=registry)
    return PredictionSink(url, settings, registry=registry, dropped=dropped), registry


def wait_for(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            msg = "timed out"
            raise SystemExit(msg)
        time.sleep(0.005)


def sink_figures() -> None:
    drains = iris_batch(random.Random(2), EVENTS, NAMED)
    predictions = [prediction for drain in drains for prediction in drain.exchanges()]
    with running_receiver() as url, on_cpu(1):
        settings = FeedbackSettings(sink_url=url, sink_queue_size=EVENTS)
        sink, registry = new_sink(url, settings)
        for prediction in predictions:  # queued before the thread starts: it never waits
            sink.submit(prediction)
        began = time.perf_counter()
        sink.start()
        thread = next(t for t in threading.enumerate() if t.name == "prediction-sink")
        clock = time.pthread_getcpuclockid(thread.ident or 0)
        wait_for(lambda: counted(registry, "sent") >= EVENTS, timeout=120)
        seconds = time.perf_counter() - began
        cpu = time.clock_gettime(clock)
        sink.stop()
    event = sink._event(predictions[0])
    print(
        f"sink: {EVENTS:,} events (one iris row each, features included) to an aiohttp receiver "
        f"on the same machine (receiver on CPU 0, sink on CPU 1): {EVENTS / seconds:,.0f} "
        f"events/s; {cpu / EVENTS * 1e6:.0f} us of CPU per event in the sink's thread; "
        f"an event {len(event.body)} bytes of body and {len(event.headers)} of headers "
        f"(ce-*, Content-Type); "
        f"retried {counted(registry, 'retried'):.0f}, dropped {counted(registry, 'dropped'):.0f}"
    )

    # A receiver that refuses connections: each event is tried sink_attempts times, then given up.
    logging.getLogger("sidecar.feedback.cloudevents").setLevel(logging.ERROR)  # expected failures
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    defaults = FeedbackSettings()
    low = sum(defaults.sink_backoff * 2**r * 0.5 for r in range(defaults.sink_attempts - 1))
    sink, registry = new_sink(f"http://127.0.0.1:{port}/", defaults)
    sink.start()
    gave_up: list[float] = []

    def given_up() -> bool:
        return counted(registry, "dropped") > len(gave_up)

    for prediction in predictions[:3]:
        began = time.monotonic()
        sink.submit(prediction)
        wait_for(given_up, timeout=10)
        gave_up.append(time.monotonic() - began)
    sink.stop()
    print(
        f"sink, receiver refusing connections, defaults (sink_attempts {defaults.sink_attempts}, "
        f"sink_backoff {defaults.sink_backoff}): given up after "
        f"{', '.join(f'{s:.2f}' for s in gave_up)} s (bounds {low:.1f} to {2 * low:.1f} s)"
    )


# --- cbpe ----------------------------------------------------------------------------------------

CBPE_ROWS = 10_000
CBPE_BATCH = 100
CLASSES = ClassNames(("a", "b", "c"))


def estimate(probabilities: np.ndarray) -> float:
    """Rows of probabilities through a FeedbackRecorder, as the pipeline hands it extractions;
    the CBPE ratio of its counters."""
    registry = CollectorRegistry()
    dropped = Counter("sidecar_dropped_observations_total", "drops", ["reason"], registry=registry)
    config = Config(upstream="http://127.0.0.1:1", model_name="synthetic")
    recorder = FeedbackRecorder(
        registry, config, dropped=dropped, overflow=OverflowCounter(registry)
    )
    for start in range(0, len(probabilities), CBPE_BATCH):
        outputs = read_probabilities(probabilities[start : start + CBPE_BATCH], CLASSES)
        recorder.record(("synthetic", "unknown"), f"s-{start:06d}", Extraction(outputs=outputs), 0)
    labels = {"model_name": "synthetic", "model_version": "unknown"}
    expected = registry.get_sample_value("ml_expected_correct_total", labels) or 0.0
    rows = registry.get_sample_value("ml_expected_correct_rows_total", labels) or 1.0
    return expected / rows


def cbpe_figures() -> None:
    # tests/test_feedback_quality.py's calibrated(seed=11): labels drawn from the probabilities.
    rng = np.random.default_rng(11)
    probabilities = rng.dirichlet([0.7, 0.7, 0.7], size=CBPE_ROWS)
    labels = (rng.random(CBPE_ROWS)[:, None] < probabilities.cumsum(axis=1)).argmax(axis=1)
    sharpened = probabilities**4
    sharpened /= sharpened.sum(axis=1, keepdims=True)
    for name, shown in (("calibrated", probabilities), ("sharpened p**4", sharpened)):
        truth = float((shown.argmax(axis=1) == labels).mean())
        guess = estimate(shown)
        print(
            f"cbpe, {CBPE_ROWS:,} synthetic rows, {name}: estimate {guess:.4f}, true accuracy "
            f"{truth:.4f}, estimate - truth {guess - truth:+.4f}"
        )


SECTIONS: dict[str, Callable[[], None]] = {
    "sqlite": sqlite_figures,
    "sink": sink_figures,
    "cbpe": cbpe_figures,
}


def main() -> None:
    if sys.argv[1:] == ["_receiver"]:
        receiver()
        return
    chosen = sys.argv[1:] or list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        msg = f"unknown sections {unknown}; choose from {list(SECTIONS)}"
        raise SystemExit(msg)
    for name in chosen:
        SECTIONS[name]()


if __name__ == "__main__":
    main()
