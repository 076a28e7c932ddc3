"""The prediction log in PostgreSQL: one table that every replica and every worker writes to, so a
label posted to any replica finds its row, and the windowed figures are the fleet's.

The driver is psycopg 3, used synchronously from the prediction log's writer thread. That thread
exists already (it owns the store so that the event loop never waits on I/O), so a blocking
driver fits it, and an async one would need a second event loop in that thread for nothing.
Batches go in with COPY, the fastest way into PostgreSQL, in its binary format; a feedback join
is three statements whatever the number of labels (find, update, record the model), never a round
trip per label. This module imports psycopg: it is itself imported only when `feedback.store` is
a PostgreSQL URL, so a sidecar without one does not load the driver.

A slow or lost database must not hang the writer for long: connections are made with a connect
timeout, TCP keepalives and a TCP user timeout (a dead host is noticed), and every statement with
a statement timeout. Any failure of the connection or the server (down, cancelled for slowness,
disk full) is raised as StoreUnavailable, and the writer reconnects later.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from sidecar.feedback.store import (
    Group,
    LoggedRow,
    NewLabel,
    RowKey,
    StoredRow,
    StoreUnavailable,
    window_query,
)

__all__ = ["SCHEMA_VERSION", "PostgresStore", "SchemaTooNew"]

STATEMENT_TIMEOUT_MS = 5_000  # the longest any statement may hold the writer
# Connection parameters used unless the URL sets them (seconds; the TCP user timeout in ms).
CONNECTION_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "application_name": "sidecar",
}
# Most rows one eviction statement deletes: a large backlog (max_age lowered, a long outage) is
# worked off over several batches instead of one statement that outlives the statement timeout.
EVICT_LIMIT = 100_000
# Advisory locks are keyed by one bigint per database; these two are ours ("sidecar" + 1 or 2).
MIGRATION_LOCK = 0x73_69_64_65_63_61_72_01
EVICTION_LOCK = 0x73_69_64_65_63_61_72_02

# MIGRATIONS[n - 1] takes the schema from version n - 1 to n (0: no tables at all).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE sidecar_predictions (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            request_id text NOT NULL,
            row integer NOT NULL,
            ts double precision NOT NULL,
            model_name text NOT NULL,
            model_version text NOT NULL,
            predicted text,
            confidence double precision,
            value double precision,
            segment text,
            features text,
            latency_ms double precision,
            label text,
            label_value double precision,
            labelled_at double precision
        )""",
        # A join of 10,000 labels is 10,000 probes of this index, whatever the table's size.
        "CREATE INDEX sidecar_predictions_request ON sidecar_predictions (request_id, row)",
        "CREATE INDEX sidecar_predictions_ts ON sidecar_predictions (ts)",
        # The windows: labelled rows of a model, newest label first (id breaks ties in a call).
        """CREATE INDEX sidecar_predictions_labelled
            ON sidecar_predictions (model_name, model_version, labelled_at, id)
            WHERE labelled_at IS NOT NULL""",
        # The models with labels, for the windows: a DISTINCT over the labelled rows would read
        # them all at every refresh.
        """CREATE TABLE sidecar_labelled_models (
            model_name text NOT NULL,
            model_version text NOT NULL,
            PRIMARY KEY (model_name, model_version)
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS sidecar_schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
# Binary: numbers go as their eight bytes, where text would have them formatted here and parsed
# there (the larger part of the writer's work per row), and text needs no escaping.
_COPY = (
    "COPY sidecar_predictions (request_id, row, ts, model_name, model_version, predicted, "
    "confidence, value, segment, features, latency_ms) FROM STDIN (FORMAT BINARY)"
)
_COPY_TYPES = (  # binary COPY is told each column's type, in LoggedRow's order
    "text",
    "int4",
    "float8",
    "text",
    "text",
    "text",
    "float8",
    "float8",
    "text",
    "text",
    "float8",
)
# Both deletes run after every batch and usually find nothing, so each is gated by a condition
# that PostgreSQL answers from one end of an index (min and max) before it plans any scan: a
# table without statistics yet, or a generic plan, cannot make them read the whole table.
_EVICT_AGED = """DELETE FROM sidecar_predictions
WHERE (SELECT min(ts) FROM sidecar_predictions) < %(cutoff)s
    AND id IN (
        SELECT id FROM sidecar_predictions WHERE ts < %(cutoff)s ORDER BY ts LIMIT %(limit)s
    )"""
# Ids are handed out in insertion order, so the newest max_rows rows are the top of the id range;
# found through the primary key rather than by counting the table. A batch that failed leaves a
# gap in the ids, so the table may hold a little less than max_rows, never more.
_EVICT_OVER = """DELETE FROM sidecar_predictions
WHERE (SELECT max(id) - min(id) + 1 FROM sidecar_predictions) > %(max_rows)s
    AND id <= least(
        (SELECT max(id) FROM sidecar_predictions) - %(max_rows)s,
        (SELECT min(id) FROM sidecar_predictions) + %(limit)s - 1
    )"""
_ID_SPAN = "SELECT coalesce(max(id) - min(id) + 1, 0) FROM sidecar_predictions"
# Every row of the labels' keys, locked in id order until the join commits: a replica labelling
# the same row at the same time waits, so "duplicate" and the replaced counts stay exact, and
# two joins cannot deadlock. The newest row of a key is picked afterwards (ids may repeat).
_FIND = """SELECT p.request_id, p.row, p.id, p.model_name, p.model_version, p.predicted, p.value,
    p.segment, p.label, p.label_value, p.labelled_at
FROM sidecar_predictions AS p
JOIN unnest(%s::text[], %s::integer[]) AS k(request_id, row)
    ON p.request_id = k.request_id AND p.row = k.row
ORDER BY p.id
FOR UPDATE OF p"""
_SET_LABELS = """UPDATE sidecar_predictions AS p
SET label = u.label, label_value = u.label_value, labelled_at = %s
FROM unnest(%s::bigint[], %s::text[], %s::double precision[]) AS u(id, label, label_value)
WHERE p.id = u.id"""
_ADD_MODELS = """INSERT INTO sidecar_labelled_models (model_name, model_version)
SELECT * FROM unnest(%s::text[], %s::text[])
ON CONFLICT DO NOTHING"""
_LABELLED = (
    "SELECT label, predicted, segment, value, label_value FROM sidecar_predictions "
    "WHERE model_name = %s AND model_version = %s AND labelled_at IS NOT NULL"
)
_GROUPED = (
    "SELECT label, predicted, segment, count(*), sum(abs(value - label_value)), "
    "sum((value - label_value) * (value - label_value)) FROM ({inner}) AS labelled "
    "GROUP BY label, predicted, segment"
)

Connection = psycopg.Connection[tuple[Any, ...]]


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer sidecar: this one does not know its tables."""


@contextmanager
def _unavailable_on_failure() -> Iterator[None]:
    """Connection and server failures as StoreUnavailable, with the first line of the reason."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreUnavailable(reason[:200]) from exc


def connect(url: str) -> Connection:
    """A connection in autocommit mode with our timeouts; the URL's own parameters win."""
    params: dict[str, Any] = {**CONNECTION_DEFAULTS, **conninfo_to_dict(url)}
    # Startup options are applied in order, so a statement_timeout in the URL's options wins.
    params["options"] = f"-c statement_timeout={STATEMENT_TIMEOUT_MS} {params.get('options', '')}"
    with _unavailable_on_failure():
        # No server-side prepared statements (psycopg prepares a query run 5 times): they break
        # behind a pooler in transaction mode, and these few statements plan in microseconds.
        return psycopg.connect(autocommit=True, prepare_threshold=None, **params)


def migrate(connection: Connection) -> None:
    """Bring the schema to SCHEMA_VERSION. Replicas starting together queue on an advisory lock
    held until the migration commits, so exactly one of them creates the tables."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        connection.execute(_VERSION_TABLE)
        current = _scalar(
            connection, "SELECT coalesce(max(version), 0) FROM sidecar_schema_version"
        )
        if current > SCHEMA_VERSION:
            msg = f"the database's schema is version {current}; this sidecar knows {SCHEMA_VERSION}"
            raise SchemaTooNew(msg)
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO sidecar_schema_version (version) VALUES (%s)", (version,)
            )


def _scalar(connection: Connection, query: str, params: Sequence[Any] = ()) -> Any:
    found = connection.execute(query, params).fetchone()
    assert found is not None  # an aggregate always answers one row
    return found[0]


class PostgresStore:
    """The shared prediction table (PredictionStore). Opening it connects and migrates."""

    def __init__(self, url: str, *, max_rows: int, max_age_seconds: float) -> None:
        self.max_rows = max_rows
        self.max_age_seconds = max_age_seconds
        self._connection = connect(url)
        try:
            with _unavailable_on_failure():
                migrate(self._connection)
                self.rows: int = _scalar(self._connection, _ID_SPAN)
        except BaseException:
            self._connection.close()
            raise

    def close(self) -> None:
        self._connection.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with _unavailable_on_failure(), self._connection.transaction():
            yield

    def append(self, rows: Sequence[LoggedRow]) -> None:
        # In autocommit, one COPY is one transaction: no BEGIN and COMMIT round trips.
        with (
            _unavailable_on_failure(),
            self._connection.cursor() as cursor,
            cursor.copy(_COPY) as copy,
        ):
            copy.set_types(_COPY_TYPES)
            for row in rows:
                copy.write_row(row)

    def evict(self, now: float) -> dict[str, int]:
        """Age and row bounds, by one replica at a time: while one evicts, the others skip it
        rather than queue behind it to delete the same rows."""
        with _unavailable_on_failure(), self._connection.transaction():
            connection = self._connection
            aged = over = 0
            if _scalar(connection, "SELECT pg_try_advisory_xact_lock(%s)", (EVICTION_LOCK,)):
                cutoff = now - self.max_age_seconds
                aged = connection.execute(
                    _EVICT_AGED, {"cutoff": cutoff, "limit": EVICT_LIMIT}
                ).rowcount
                over = connection.execute(
                    _EVICT_OVER, {"max_rows": self.max_rows, "limit": EVICT_LIMIT}
                ).rowcount
            self.rows = _scalar(connection, _ID_SPAN)
        return {"max_age": aged, "max_rows": over}

    def find(self, keys: Iterable[RowKey]) -> dict[RowKey, StoredRow]:
        unique = list(set(keys))
        request_ids, rows = [key[0] for key in unique], [key[1] for key in unique]
        found: dict[RowKey, StoredRow] = {}
        with _unavailable_on_failure():
            for request_id, row, *stored in self._connection.execute(_FIND, (request_ids, rows)):
                found[request_id, row] = StoredRow(*stored)  # in id order: the newest stays
        return found

    def set_labels(self, labels: Sequence[NewLabel], now: float) -> None:
        if not labels:
            return
        ids = [new.found.id for new in labels]
        texts = [new.label for new in labels]
        values = [new.label_value for new in labels]
        models = sorted({(new.found.model_name, new.found.model_version) for new in labels})
        with _unavailable_on_failure():
            self._connection.execute(_SET_LABELS, (now, ids, texts, values))
            # Sorted, so that two joins adding the same new models cannot deadlock.
            self._connection.execute(
                _ADD_MODELS, ([name for name, _ in models], [version for _, version in models])
            )

    def labelled_models(self) -> set[tuple[str, str]]:
        query = "SELECT model_name, model_version FROM sidecar_labelled_models"
        with _unavailable_on_failure():
            return {(name, version) for name, version in self._connection.execute(query)}

    def window(
        self, model: tuple[str, str], *, last_rows: int | None = None, since: float | None = None
    ) -> list[Group]:
        query, params = window_query(
            _LABELLED, _GROUPED, "%s", model, last_rows=last_rows, since=since
        )
        with _unavailable_on_failure():
            found = self._connection.execute(query, params).fetchall()
        return [Group(*group) for group in found]
