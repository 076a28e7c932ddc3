"""The plain data that extraction hands to the recorders: features, outputs, and what went wrong.

Nothing here knows about HTTP or Prometheus. Arrays are numpy, one row per item of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import numpy as np
from numpy.typing import NDArray

ErrorType = Literal["request_parse", "response_parse", "mapping"]


class Message(msgspec.Struct, frozen=True, gc=False):  # made per exchange: a cheap Struct
    """One side of an exchange as extraction sees it: the raw body and lower-cased header names.

    `arrivals` says when a response body arrived, as (bytes so far, seconds since the request
    came in) per piece; streams (server-sent events) are timed by it. Empty when not known.
    """

    body: bytes
    headers: Mapping[str, str]
    arrivals: Sequence[tuple[int, float]] = ()


@dataclass(frozen=True, slots=True)
class FeatureTable:
    """Request features as a rows x columns table.

    `numeric` holds every cell that is a JSON number (NaN and +/-inf literals kept as such) and
    NaN everywhere else. `missing` marks cells that are absent or null; `non_numeric` marks cells
    that are present but not a number (strings, booleans, lists, objects). `strings` holds, for
    each column that has any non-numeric cell, that column's cells as `str` (None where missing or
    numeric), so categorical features and "wrong type" checks are answered from one table.
    Columns carry the names the payload or the config gave, else their position ("0", "1", ...).
    """

    columns: tuple[str, ...]
    numeric: NDArray[np.float64]
    missing: NDArray[np.bool_]
    non_numeric: NDArray[np.bool_]
    strings: Mapping[str, NDArray[np.object_]] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return int(self.numeric.shape[0])

    def rows(self, start: int, stop: int) -> FeatureTable:
        """Rows start..stop-1 (views, not copies)."""
        return FeatureTable(
            self.columns,
            self.numeric[start:stop],
            self.missing[start:stop],
            self.non_numeric[start:stop],
            {name: texts[start:stop] for name, texts in self.strings.items()},
        )


@dataclass(frozen=True, slots=True)
class Outputs:
    """Model outputs per row: a class label, its confidence, and/or a regression value."""

    classes: NDArray[np.object_] | None = None
    confidence: NDArray[np.float64] | None = None
    value: NDArray[np.float64] | None = None

    def rows(self, start: int, stop: int) -> Outputs:
        """Rows start..stop-1 (views, not copies)."""
        return self.take(slice(start, stop))

    def take(self, rows: slice | NDArray[np.bool_]) -> Outputs:
        """The rows a slice or a mask picks."""
        return Outputs(
            None if self.classes is None else self.classes[rows],
            None if self.confidence is None else self.confidence[rows],
            None if self.value is None else self.value[rows],
        )


def _no_gaps() -> NDArray[np.float64]:
    return np.zeros(0)


@dataclass(frozen=True, slots=True)
class Generation:
    """What one LLM call (OpenAI-style chat, completion or embedding) produced, for the LLM metrics.

    Times are seconds as the sidecar saw them: `ttft` from the request's arrival to the first
    event that carried output (None when the reply was not streamed, or had no output);
    `token_gaps` between consecutive output events. Token counts come from the reply's `usage`
    only, never estimated: `usage_known` is False when the server sent none (a stream whose
    client did not ask for it), and then both counts are None. Lengths are in characters.
    """

    model_name: str | None = None  # as the request named it
    streamed: bool = False  # the request asked for a stream
    ttft: float | None = None
    token_gaps: NDArray[np.float64] = field(default_factory=_no_gaps)
    usage_known: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reasons: tuple[str, ...] = ()  # one per choice that finished
    prompt_chars: int | None = None
    completion_chars: int | None = None


@dataclass(frozen=True, slots=True)
class Extraction:
    """Everything one exchange yielded. A failure on one side leaves the other side usable."""

    features: FeatureTable | None = None
    outputs: Outputs = field(default_factory=Outputs)
    batch_size: int = 0
    model_name: str | None = None
    model_version: str | None = None
    errors: tuple[ErrorType, ...] = ()
    generation: Generation | None = None  # LLM routes only


Extractor = Callable[[Message, Message], Extraction]
"""extract(request, response) -> Extraction. Never raises on bad payloads: it reports `errors`."""
