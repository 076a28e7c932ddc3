"""The prediction log in a SQLite file (WAL): one process's store, the default."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

from sidecar.feedback.store import Group, LoggedRow, NewLabel, RowKey, StoredRow, window_query

__all__ = ["SQLiteStore"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    row INTEGER NOT NULL,
    ts REAL NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    predicted TEXT,
    confidence REAL,
    value REAL,
    segment TEXT,
    features TEXT,
    latency_ms REAL,
    label TEXT,
    label_value REAL,
    labelled_at REAL
);
CREATE INDEX IF NOT EXISTS predictions_request ON predictions (request_id, row);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts);
CREATE INDEX IF NOT EXISTS predictions_labelled
    ON predictions (model_name, model_version, labelled_at) WHERE labelled_at IS NOT NULL;
"""

_INSERT_INTO = (
    "INSERT INTO predictions (request_id, row, ts, model_name, model_version, predicted, "
    "confidence, value, segment, features, latency_ms) VALUES "
)
_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT = _INSERT_INTO + _VALUES
# Rows per INSERT statement. Each execution of a statement costs about as much as inserting the
# row (its cursors opened, its program started, a round through the driver), so a batch goes in
# statements of this many rows: 550 parameters, within the 999 that SQLite allowed before 3.32.
INSERT_ROWS = 50
_INSERT_MANY = _INSERT_INTO + ", ".join([_VALUES] * INSERT_ROWS)
_FIND = (
    "SELECT id, model_name, model_version, predicted, value, segment, label, label_value, "
    "labelled_at FROM predictions WHERE request_id = ? AND row = ? ORDER BY id DESC LIMIT 1"
)
# The newest labelled rows of one model; the partial index (whose entries end with the rowid)
# serves both the filter and the order.
_LABELLED = (
    "SELECT label, predicted, segment, value, label_value FROM predictions "
    "WHERE model_name = ? AND model_version = ? AND labelled_at IS NOT NULL"
)
_GROUPED = (
    "SELECT label, predicted, segment, count(*), sum(abs(value - label_value)), "
    "sum((value - label_value) * (value - label_value)) FROM ({inner}) "
    "GROUP BY label, predicted, segment"
)


class SQLiteStore:
    """The prediction table in a SQLite file in WAL mode (PredictionStore).

    Local to the process: SQLite is read in place, so a join is one indexed lookup per label.
    """

    def __init__(self, path: str, *, max_rows: int, max_age_seconds: float) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.max_age_seconds = max_age_seconds
        # Autocommit mode: transactions are explicit (one per batch, one per feedback call).
        self._db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a crash of the process loses nothing; a power cut loses the last batch.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.rows: int = self._db.execute("SELECT count(*) FROM predictions").fetchone()[0]
            self._labelled_models: set[tuple[str, str]] = set(
                self._db.execute(
                    "SELECT DISTINCT model_name, model_version FROM predictions "
                    "WHERE labelled_at IS NOT NULL"
                ).fetchall()
            )
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def append(self, rows: Sequence[LoggedRow]) -> None:
        whole = len(rows) - len(rows) % INSERT_ROWS
        runs = (  # INSERT_ROWS rows one after the other: the parameters of one statement
            tuple(chain.from_iterable(rows[at : at + INSERT_ROWS]))
            for at in range(0, whole, INSERT_ROWS)
        )
        with self.transaction():
            self._db.executemany(_INSERT_MANY, runs)
            self._db.executemany(_INSERT, rows[whole:])
            self.rows += len(rows)

    def evict(self, now: float) -> dict[str, int]:
        with self.transaction():
            aged = self._db.execute(
                "DELETE FROM predictions WHERE ts < ?", (now - self.max_age_seconds,)
            ).rowcount
            # Ids grow by one per row and only a prefix is ever deleted, so this keeps the newest
            # max_rows rows, found through the primary key rather than by counting the table.
            over = self._db.execute(
                "DELETE FROM predictions WHERE id <= (SELECT max(id) FROM predictions) - ?",
                (self.max_rows,),
            ).rowcount
        self.rows -= aged + over
        return {"max_age": aged, "max_rows": over}

    def find(self, keys: Iterable[RowKey]) -> dict[RowKey, StoredRow]:
        # In-process lookups cost microseconds each: no round trips to batch.
        found = {}
        for key in keys:
            row = self._db.execute(_FIND, key).fetchone()
            if row is not None:
                found[key] = StoredRow(*row)
        return found

    def set_labels(self, labels: Sequence[NewLabel], now: float) -> None:
        self._db.executemany(
            "UPDATE predictions SET label = ?, label_value = ?, labelled_at = ? WHERE id = ?",
            [(new.label, new.label_value, now, new.found.id) for new in labels],
        )
        self._labelled_models.update(
            (new.found.model_name, new.found.model_version) for new in labels
        )

    def labelled_models(self) -> set[tuple[str, str]]:
        return set(self._labelled_models)

    def window(
        self, model: tuple[str, str], *, last_rows: int | None = None, since: float | None = None
    ) -> list[Group]:
        query, params = window_query(
            _LABELLED, _GROUPED, "?", model, last_rows=last_rows, since=since
        )
        return [Group(*found) for found in self._db.execute(query, params).fetchall()]
