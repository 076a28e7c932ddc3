"""What the prediction log keeps and how it is asked: the rows, and the store interface that the
SQLite file (sqlite.py) and the shared PostgreSQL table (postgres.py) both implement.

A store is used by exactly one thread (the prediction log's writer); nothing here is async. Rows
are appended in id order, so the oldest rows are the lowest ids and eviction removes a prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

__all__ = [
    "MISSING_SEGMENT",
    "Group",
    "LoggedRow",
    "NewLabel",
    "PredictionStore",
    "RowKey",
    "StoreUnavailable",
    "StoredRow",
    "is_postgres_url",
    "window_query",
]

MISSING_SEGMENT = "__missing__"  # the segment of a row without the segment feature

_POSTGRES_URL = re.compile(r"postgres(ql)?://")  # libpq takes no other spelling

RowKey = tuple[str, int]  # (request_id, row): what a label names


def is_postgres_url(store: str) -> bool:
    """Whether `feedback.store` names a PostgreSQL database rather than a SQLite file.

    >>> is_postgres_url("postgres://u@db/x"), is_postgres_url("/var/lib/sidecar/p.db")
    (True, False)
    """
    return _POSTGRES_URL.match(store) is not None


class StoreUnavailable(ConnectionError):
    """The store cannot be reached now (database down, too slow, full): the writer drops rows,
    /feedback answers 503, and the store is opened again later."""


class LoggedRow(NamedTuple):
    """One predicted row as the log writes it (features already JSON text, or None)."""

    request_id: str
    row: int
    ts: float
    model_name: str
    model_version: str
    predicted: str | None
    confidence: float | None
    value: float | None
    segment: str | None
    features: str | None
    latency_ms: float


class StoredRow(NamedTuple):
    """What a feedback join needs of a logged row."""

    id: int
    model_name: str
    model_version: str
    predicted: str | None
    value: float | None
    segment: str | None
    label: str | None
    label_value: float | None
    labelled_at: float | None


class NewLabel(NamedTuple):
    """A label joined to a logged row: the row as it was found, and the label it now gets."""

    found: StoredRow
    label: str | None
    label_value: float | None


class Group(NamedTuple):
    """Labelled rows of a window with the same (label, predicted, segment), and their errors."""

    label: str | None
    predicted: str | None
    segment: str | None
    rows: int
    absolute_error: float | None
    squared_error: float | None


class PredictionStore(Protocol):
    """The prediction table, bounded by `max_rows` and `max_age_seconds`.

    `rows` is how many rows it holds, kept up to date without counting the table. A store that
    loses its database raises StoreUnavailable from any method; the caller closes it and opens a
    new one later.
    """

    rows: int

    def close(self) -> None: ...

    def transaction(self) -> AbstractContextManager[None]:
        """One transaction around a feedback join: the rows found stay as found until it ends."""
        ...

    def append(self, rows: Sequence[LoggedRow]) -> None:
        """Insert a batch, in one transaction."""
        ...

    def evict(self, now: float) -> dict[str, int]:
        """Remove the oldest rows beyond the bounds; how many went for each reason."""
        ...

    def find(self, keys: Iterable[RowKey]) -> dict[RowKey, StoredRow]:
        """The newest logged row for each (request_id, row) that has one (ids may repeat)."""
        ...

    def set_labels(self, labels: Sequence[NewLabel], now: float) -> None:
        """Store each label on its row (one label per row id), stamped `now`."""
        ...

    def labelled_models(self) -> set[tuple[str, str]]:
        """(model_name, model_version) of every model that has had a label."""
        ...

    def window(
        self, model: tuple[str, str], *, last_rows: int | None = None, since: float | None = None
    ) -> list[Group]:
        """Labelled rows of a model grouped by (label, predicted, segment): the `last_rows` most
        recently labelled, or those labelled at or after `since`."""
        ...


def window_query(
    labelled: str,
    grouped: str,
    mark: str,
    model: tuple[str, str],
    *,
    last_rows: int | None,
    since: float | None,
) -> tuple[str, list[Any]]:
    """The query of a window's groups, and its parameters: `labelled` selects one model's
    labelled rows, `grouped` groups what its `{inner}` selects, `mark` is the driver's
    parameter placeholder (SQLite's ?, psycopg's %s)."""
    inner = labelled
    params: list[Any] = list(model)
    if since is not None:
        inner += f" AND labelled_at >= {mark}"
        params.append(since)
    if last_rows is not None:
        inner += f" ORDER BY labelled_at DESC, id DESC LIMIT {mark}"
        params.append(last_rows)
    return grouped.format(inner=inner), params
