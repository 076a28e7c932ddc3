"""Many small exchanges of one route read as one batch.

Reading one exchange costs a few microseconds of JSON parsing and tens of microseconds of numpy
set-up (the table's arrays, argmax, labels), whatever its size; the recorders then pay again per
call. Under load, exchanges of one route queue up between two turns of the event loop: reading the
rows of all of them as one list makes that cost per batch instead of per request.

The result must be what reading each exchange alone gives, concatenated. So only bodies whose rows
sit in a plain list are merged (Rows says where), only when the merged outputs come from the
vectorised paths, where every row is read on its own, and only exchanges whose every feature cell
is a number. Anything else (a null, a string, ragged rows, a parse error) is read alone by the
plan's own readers, from the bodies already decoded: each body is parsed once either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sidecar.extract.body import Parsed
from sidecar.extract.plan import (
    BAD_PAYLOAD,
    Decoding,
    Plan,
    Rows,
    assemble_decoded,
    decode_body,
)
from sidecar.extract.types import Extraction, FeatureTable, Message

__all__ = ["MAX_MERGED_ROWS", "Batch", "BatchReader", "Merged", "batch_reader"]

# Exchanges this large are read alone: their own numpy work already amortises the set-up.
MAX_MERGED_ROWS = 64


@dataclass(frozen=True, slots=True)
class Merged:
    """The exchanges at `members` (positions in the input, in order) read as one extraction;
    `row_counts` says how many of its rows each of them brought."""

    extraction: Extraction
    members: list[int]
    row_counts: list[int]


@dataclass(frozen=True, slots=True)
class Batch:
    """What a batch reader made of its exchanges: those it merged, and each of the others read
    alone as (position, extraction). Every body was decoded once."""

    merged: Merged | None
    alone: list[tuple[int, Extraction]]


BatchReader = Callable[[Sequence[tuple[Message, Message]]], Batch]
"""(request, response) pairs of one route -> every one of them read, merged where possible."""


def batch_reader(plan: Plan) -> BatchReader | None:
    """The plan's reader for many exchanges at once; None if the plan has no row shortcut."""
    rows = plan.rows
    if rows is None or plan.extractor is not None:
        return None
    read_alone = assemble_decoded(plan)
    decode_request, decode_response = plan.decode_request, plan.decode_response

    def read(pairs: Sequence[tuple[Message, Message]]) -> Batch:
        decoded = [
            (decode_body(request, decode_request), decode_body(response, decode_response))
            for request, response in pairs
        ]
        merged = _merge(rows, decoded)
        if merged is not None and len(merged.members) == len(decoded):
            return Batch(merged, [])  # the usual case: every exchange merged
        taken = set(merged.members) if merged is not None else set()
        alone = [
            (position, read_alone(request, response))
            for position, (request, response) in enumerate(decoded)
            if position not in taken
        ]
        return Batch(merged, alone)

    return read


def _merge(rows: Rows, decoded: list[tuple[Decoding, Decoding]]) -> Merged | None:
    """The exchanges whose rows read as one table and one set of outputs, if two or more do."""
    request_rows: list[Any] = []
    response_rows: list[Any] = []
    members: list[int] = []
    counts: list[int] = []
    check_booleans = False
    feature_rows, output_rows = rows.features, rows.outputs
    for position, (request, response) in enumerate(decoded):
        if not isinstance(request, Parsed) or not isinstance(response, Parsed):
            continue
        features, outputs = feature_rows(request.value), output_rows(response.value)
        if features is None or outputs is None:
            continue
        found = len(features)
        if len(outputs) != found or found > MAX_MERGED_ROWS:
            continue
        request_rows += features
        response_rows += outputs
        check_booleans = check_booleans or request.may_hold_booleans
        members.append(position)
        counts.append(found)
    if len(members) < 2:
        return None
    return _read(rows, request_rows, response_rows, check_booleans, members, counts)


def _read(
    rows: Rows,
    request_rows: list[Any],
    response_rows: list[Any],
    check_booleans: bool,
    members: list[int],
    counts: list[int],
) -> Merged | None:
    """One table and one set of outputs for all the rows; members with a row that is not all
    numbers (a null, a string, a short row) are dropped from the result, to be read alone."""
    try:
        table = rows.table(request_rows, check_booleans)
        outputs = rows.predictions(response_rows)
    except BAD_PAYLOAD:
        return None
    n = len(request_rows)
    if outputs is None or table.n_rows != n:
        return None
    flagged = table.missing.any(axis=1) | table.non_numeric.any(axis=1)
    if not flagged.any():
        return Merged(Extraction(features=table, outputs=outputs, batch_size=n), members, counts)
    owner = np.repeat(np.arange(len(members)), counts)  # row -> position in members
    spoiled = np.zeros(len(members), dtype=bool)
    spoiled[owner[flagged]] = True
    if np.count_nonzero(~spoiled) < 2:
        return None
    keep = ~spoiled[owner]
    clean = FeatureTable(  # kept rows are all numbers: no flags, no strings
        table.columns,
        table.numeric[keep],
        np.zeros((int(keep.sum()), len(table.columns)), dtype=bool),
        np.zeros((int(keep.sum()), len(table.columns)), dtype=bool),
    )
    kept = np.flatnonzero(~spoiled).tolist()
    return Merged(
        Extraction(features=clean, outputs=outputs.take(keep), batch_size=clean.n_rows),
        [members[i] for i in kept],
        [counts[i] for i in kept],
    )
