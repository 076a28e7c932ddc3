"""The prediction log on a real, shared PostgreSQL (tests/postgres.py): the schema and its
migration, a fleet of sidecars writing to one table and taking labels for each other's rows, and
the proxy failing open while the database is down, slow or restarting.

The store's contract (bounds, joins, windows) is held to the SQLite store's in
test_feedback_store.py; this file is what only a shared database has.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from sidecar.app import Sidecar
from sidecar.demo.model import CLASSES
from sidecar.feedback.postgres import SCHEMA_VERSION, PostgresStore, SchemaTooNew
from tests.conftest import StartSidecar, assert_sample, scrape, scrape_until
from tests.postgres import PostgresCluster
from tests.test_feedback import (
    assert_matches_reference,
    iris_rows,
    iris_settings,
    logged,
    post_feedback,
    predict,
    value,
)


def labels_for(predictions: list[tuple[str, int, str]], truth: list[int]) -> list[dict[str, Any]]:
    return [
        {"request_id": request_id, "row": row, "label": CLASSES[truth[index]]}
        for index, (request_id, row, _) in enumerate(predictions)
    ]


# --- the schema ----------------------------------------------------------------------------------


def test_replicas_starting_together_migrate_once(postgres_url: str) -> None:
    """Eight stores opened at the same instant on an empty database: all open, the tables are
    created once, and the schema is at the current version."""
    barrier, opened, failed = threading.Barrier(8), [], []

    def open_one() -> None:
        barrier.wait()
        try:
            opened.append(PostgresStore(postgres_url, max_rows=10, max_age_seconds=1.0))
        except Exception as exc:
            failed.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in opened:
        store.close()
    assert failed == []
    with psycopg.connect(postgres_url) as connection:
        versions = connection.execute("SELECT version FROM sidecar_schema_version").fetchall()
    assert versions == [(SCHEMA_VERSION,)] == [(1,)]


def test_a_schema_newer_than_ours_is_refused(postgres_url: str) -> None:
    """A database migrated by a newer sidecar is not written with an older idea of its tables."""
    PostgresStore(postgres_url, max_rows=10, max_age_seconds=1.0).close()
    with psycopg.connect(postgres_url) as connection:
        connection.execute("INSERT INTO sidecar_schema_version (version) VALUES (%s)", (2,))
    with pytest.raises(SchemaTooNew, match="version 2"):
        PostgresStore(postgres_url, max_rows=10, max_age_seconds=1.0)


def test_timeouts_are_set_and_the_url_can_override_them(postgres_url: str) -> None:
    """A statement timeout protects the writer; one given in the URL's options wins."""
    store = PostgresStore(postgres_url, max_rows=10, max_age_seconds=1.0)
    custom = PostgresStore(
        f"{postgres_url}?options=-c%20statement_timeout%3D1234", max_rows=10, max_age_seconds=1.0
    )
    try:
        assert store._connection.execute("SHOW statement_timeout").fetchone() == ("5s",)
        assert custom._connection.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
    finally:
        store.close()
        custom.close()


# --- a fleet on one table ------------------------------------------------------------------------


async def test_labels_posted_to_the_other_replica_all_match(
    postgres_url: str, toy_model: str, start_sidecar: StartSidecar
) -> None:
    """Two sidecars in front of a real model share one database. Each takes the labels for the
    other's predictions: every label matches, both report the fleet's exact accuracy (the same
    figure), and the label counters count where the labels were applied."""
    first = await start_sidecar(toy_model, **iris_settings(postgres_url))
    second = await start_sidecar(toy_model, **iris_settings(postgres_url))
    rows, truth = iris_rows(3_000, seed=11)
    by_first = await predict(first, rows[:1_500], batch=10, prefix="a")
    by_second = await predict(second, rows[1_500:], batch=10, prefix="b")
    await logged(first, 1_500)
    await logged(second, 1_500)

    status, counts = await post_feedback(second, labels_for(by_first, truth[:1_500]))
    assert (status, counts["matched"]) == (200, 1_500), counts
    status, counts = await post_feedback(first, labels_for(by_second, truth[1_500:]))
    assert (status, counts["matched"]) == (200, 1_500), counts

    predictions = by_first + by_second
    names = [CLASSES[t] for t in truth]
    guessed = [p for _, _, p in predictions]
    accuracy = sum(n == g for n, g in zip(names, guessed, strict=True)) / len(names)
    assert 0.5 < accuracy < 1.0  # the model errs, so the figure says something
    for sidecar in (first, second):
        text = await scrape_until(
            sidecar, lambda t: value(t, "ml_labelled_rows", window="20000_rows") == 3_000
        )
        assert value(text, "ml_accuracy", window="20000_rows", segment="") == accuracy
        assert_matches_reference(text, names, guessed, "20000_rows")
        assert value(text, "sidecar_prediction_log_rows") == 3_000
        assert_sample(text, "ml_feedback_total", 1_500, model_name="iris", result="matched")
    # The counters: each replica counted the labels it applied; their sum is the fleet's matrix.
    matrix = Counter(zip(names, guessed, strict=True))
    texts = [await scrape(first), await scrape(second)]
    for (label, guess), count in matrix.items():
        cell = {"class": label, "predicted": guess, "model_name": "iris"}
        assert sum(value(text, "ml_labelled_total", **cell) for text in texts) == count


async def test_the_same_labels_on_two_replicas_at_once_count_once(
    postgres_url: str, toy_model: str, start_sidecar: StartSidecar
) -> None:
    """The same 2,000 labels posted to both replicas at the same time: each row is matched once
    and found labelled once (a join locks its rows), so the fleet's counters hold each label once
    as labelled and once as replaced."""
    first = await start_sidecar(toy_model, **iris_settings(postgres_url))
    second = await start_sidecar(toy_model, **iris_settings(postgres_url))
    rows, truth = iris_rows(2_000, seed=12)
    predictions = await predict(first, rows, batch=20)
    await logged(first, 2_000)
    items = labels_for(predictions, truth)
    answers = await asyncio.gather(post_feedback(first, items), post_feedback(second, items))
    totals: Counter[str] = Counter()
    for status, counts in answers:
        assert status == 200
        totals.update(counts)
    assert (totals["matched"], totals["duplicate"]) == (2_000, 2_000)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_labels_for_one_row_in_one_call_apply_in_order(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    toy_model: str,
    start_sidecar: StartSidecar,
) -> None:
    """Three labels for the same row in one call count as if posted one by one: the first
    matches, the second replaces it, the third repeats it (a no-op); the row keeps the last."""
    store = (
        str(tmp_path / "log.db") if kind == "sqlite" else request.getfixturevalue("postgres_url")
    )
    sidecar = await start_sidecar(toy_model, **iris_settings(store))
    [(request_id, row, predicted)] = await predict(sidecar, [[5.0, 3.4, 1.5, 0.2]], batch=1)
    await logged(sidecar, 1)
    other = next(name for name in CLASSES if name != predicted)
    items = [
        {"request_id": request_id, "row": row, "label": label}
        for label in (other, predicted, predicted)
    ]
    status, counts = await post_feedback(sidecar, items)
    assert (status, counts["matched"], counts["duplicate"]) == (200, 1, 2)
    text = await scrape_until(
        sidecar, lambda t: value(t, "ml_labelled_rows", window="20000_rows") == 1
    )
    assert value(text, "ml_accuracy", window="20000_rows", segment="") == 1.0
    right = {"class": predicted, "predicted": predicted}
    wrong = {"class": other, "predicted": predicted}
    assert value(text, "ml_labelled_total", **right) == 1
    assert value(text, "ml_labelled_total", **wrong) == 1
    assert value(text, "ml_labelled_replaced_total", **wrong) == 1


# --- failing open --------------------------------------------------------------------------------


class Load:
    """Requests through the proxy, 8 at a time, until stopped: every status is kept."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.statuses: Counter[int] = Counter()
        self._url = f"{sidecar.proxy_url}/v1/models/iris:predict"
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._client(n)) for n in range(8)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _client(self, number: int) -> None:
        body = json.dumps({"instances": [[5.0, 3.4, 1.5, 0.2]]})
        deadline = time.monotonic() + 60  # bounded, should a test forget to stop it
        sent = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            headers = {"X-Request-ID": f"load-{number}-{sent}"}
            async with self._session.post(self._url, data=body, headers=headers) as response:
                await response.read()
                self.statuses[response.status] += 1
            sent += 1


async def until(sidecar: Sidecar, name: str, check: Any, **labels: str) -> str:
    text = await scrape_until(sidecar, lambda t: check(value(t, name, **labels)))
    assert check(value(text, name, **labels)), f"{name} is {value(text, name, **labels)}"
    return text


async def test_database_restarted_under_load(
    postgres_cluster: PostgresCluster,
    postgres_url: str,
    toy_model: str,
    start_sidecar: StartSidecar,
) -> None:
    """PostgreSQL crashes (pg_ctl stop -m immediate) and comes back while requests flow: every
    request is answered 200; the lost rows are counted; /feedback answers 503 saying why and
    sidecar_prediction_log_up is 0 meanwhile; then the writer reconnects, the gauge is 1 again,
    and rows are written and labelled again."""
    sidecar = await start_sidecar(toy_model, **iris_settings(postgres_url, queue_rows=200))
    async with Load(sidecar) as load:
        await until(sidecar, "sidecar_prediction_log_written_total", lambda v: v >= 50)
        await asyncio.to_thread(postgres_cluster.stop, "immediate")
        text = await until(sidecar, "sidecar_prediction_log_up", lambda v: v == 0)
        status, body = await post_feedback(sidecar, {"request_id": "load-0-0", "label": 0})
        assert status == 503
        assert "unreachable" in body["error"]
        await until(
            sidecar,
            "sidecar_dropped_observations_total",
            lambda v: v > 0,
            reason="prediction_log_error",
        )
        await asyncio.to_thread(postgres_cluster.start)
        text = await until(sidecar, "sidecar_prediction_log_up", lambda v: v == 1)
        written = value(text, "sidecar_prediction_log_written_total")
        await until(sidecar, "sidecar_prediction_log_written_total", lambda v: v >= written + 50)
    assert set(load.statuses) == {200}, load.statuses
    # A row written after the recovery takes its label.
    predictions = await predict(sidecar, [[5.0, 3.4, 1.5, 0.2]], batch=1, prefix="after")
    await until(sidecar, "sidecar_prediction_log_written_total", lambda v: v >= written + 51)
    status, counts = await post_feedback(sidecar, labels_for(predictions, [0]))
    assert (status, counts["matched"]) == (200, 1)


async def test_a_slow_database_cannot_hold_the_writer(
    postgres_url: str, toy_model: str, start_sidecar: StartSidecar
) -> None:
    """A table locked by someone else (a slow database, as the writer sees it): the statement
    timeout (200 ms here, from the URL) frees the writer, rows are dropped and counted rather
    than queued behind it, /feedback answers 503; once the lock goes, rows are written again."""
    url = f"{postgres_url}?options=-c%20statement_timeout%3D200"
    sidecar = await start_sidecar(toy_model, **iris_settings(url))
    await predict(sidecar, [[5.0, 3.4, 1.5, 0.2]], batch=1, prefix="before")
    await logged(sidecar, 1)
    with psycopg.connect(postgres_url) as blocker:
        # In a thread: the lock may wait for the writer's statement, which the loop must not.
        lock = "LOCK TABLE sidecar_predictions IN ACCESS EXCLUSIVE MODE"
        await asyncio.to_thread(blocker.execute, lock)
        async with Load(sidecar) as load:
            await until(sidecar, "sidecar_prediction_log_up", lambda v: v == 0)
            status, body = await post_feedback(sidecar, {"request_id": "load-0-0", "label": 0})
            assert status == 503
            assert "statement timeout" in body["error"]
        blocker.rollback()
    assert set(load.statuses) == {200}, load.statuses
    text = await until(sidecar, "sidecar_prediction_log_up", lambda v: v == 1)
    assert value(text, "sidecar_dropped_observations_total", reason="prediction_log_error") > 0
    await predict(sidecar, [[5.0, 3.4, 1.5, 0.2]], batch=1, prefix="after")
    written = value(text, "sidecar_prediction_log_written_total")
    await until(sidecar, "sidecar_prediction_log_written_total", lambda v: v >= written + 1)


async def test_an_unreachable_database_at_start_leaves_the_proxy_serving(
    refusing_url: str, toy_model: str, start_sidecar: StartSidecar
) -> None:
    """No database yet when the sidecar starts: it serves, /feedback answers 503 with the reason,
    and sidecar_prediction_log_up is 0 while the writer keeps trying."""
    port = refusing_url.rsplit(":", 1)[1]
    sidecar = await start_sidecar(
        toy_model, **iris_settings(f"postgresql://sidecar@127.0.0.1:{port}/none")
    )
    assert len(await predict(sidecar, [[5.0, 3.4, 1.5, 0.2]] * 4, batch=2)) == 4
    status, body = await post_feedback(sidecar, {"request_id": "a", "label": 1})
    assert status == 503
    assert "unreachable" in body["error"]
    assert value(await scrape(sidecar), "sidecar_prediction_log_up") == 0
