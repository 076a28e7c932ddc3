"""What a route reads on each side (a Plan) and the extractor closure assembled from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sidecar.extract.body import Decoded, Parsed, decode
from sidecar.extract.errors import BodyError
from sidecar.extract.predictions import ClassNames, read_prediction_rows
from sidecar.extract.tables import table_from_value
from sidecar.extract.types import ErrorType, Extraction, Extractor, FeatureTable, Message, Outputs

__all__ = [
    "BAD_PAYLOAD",
    "DecodedExtractor",
    "Decoder",
    "Decoding",
    "FeatureReader",
    "OutputReader",
    "Plan",
    "RowFinder",
    "Rows",
    "TextReader",
    "Vocabulary",
    "assemble",
    "assemble_decoded",
    "decode_body",
]

FeatureReader = Callable[[Parsed], FeatureTable | None]
"""Parsed request -> feature table; None when the payload carries no features by design."""
OutputReader = Callable[[Any], Outputs]
"""Parsed response body -> outputs."""
TextReader = Callable[[Any], str | None]
"""Parsed response body -> a model name or version."""
Decoder = Callable[[Message], Decoded]
"""Message -> parsed body or SKIPPED; raises BodyError. JSON by default; a streaming protocol
(e.g. server-sent events) brings its own."""
RowFinder = Callable[[Any], list[Any] | None]
"""Parsed body -> its rows, one list item per row; None when the body is not a plain row list."""

# Readers walk untrusted JSON the EAFP way: a missing key is a KeyError, a list where an object was
# expected a TypeError, a bad reshape a ValueError, very deep nesting a RecursionError. Each of
# them means "the payload is not shaped as the mapping says", which is what `mapping` reports.
BAD_PAYLOAD = (ValueError, TypeError, LookupError, ArithmeticError, RecursionError)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """Names from the config that a preset applies: positional feature names, class names."""

    feature_names: tuple[str, ...] | None = None
    classes: ClassNames = field(default_factory=ClassNames)


@dataclass(frozen=True, slots=True)
class Rows:
    """How a plan reads many small exchanges as one batch (sidecar.extract.batch): where each
    body keeps its rows, and how the rows of many bodies, concatenated, become one table and one
    set of outputs. It must agree with the plan's own readers on every body it finds rows in."""

    features: RowFinder  # parsed request value -> its feature rows
    outputs: RowFinder  # parsed response value -> its prediction rows
    table: Callable[[list[Any], bool], FeatureTable]  # (rows, check_booleans) -> table
    predictions: Callable[[list[Any]], Outputs | None]  # None unless read the vectorised way

    @classmethod
    def common(cls, vocabulary: Vocabulary, features: RowFinder, outputs: RowFinder) -> Rows:
        """Rows read as most presets read them: table_from_value and read_predictions."""
        names, classes = vocabulary.feature_names, vocabulary.classes

        def table(rows: list[Any], check_booleans: bool) -> FeatureTable:
            return table_from_value(rows, names, check_booleans=check_booleans)

        def predictions(rows: list[Any]) -> Outputs | None:
            return read_prediction_rows(rows, classes)

        return cls(features, outputs, table, predictions)


@dataclass(frozen=True, slots=True)
class Plan:
    """The readers of one route; a None reader means that side or field is not read at all."""

    features: FeatureReader | None = None
    outputs: OutputReader | None = None
    model_name: TextReader | None = None
    model_version: TextReader | None = None
    decode_request: Decoder = decode
    decode_response: Decoder = decode
    # A preset that reads both sides at once (openai: model and prompt from the request, usage
    # and stream timings from the reply) brings a whole extractor; `assemble` returns it as is.
    extractor: Extractor | None = None
    rows: Rows | None = None  # None: every exchange is read on its own

    def overlay(self, other: Plan) -> Plan:
        """This plan with every reader that `other` sets replaced by `other`'s."""
        replaced = any(
            reader is not None
            for reader in (
                other.features, other.outputs, other.model_name, other.model_version,
                other.extractor,
            )
        )  # fmt: skip
        return Plan(
            features=other.features or self.features,
            outputs=other.outputs or self.outputs,
            model_name=other.model_name or self.model_name,
            model_version=other.model_version or self.model_version,
            decode_request=self.decode_request,
            decode_response=self.decode_response,
            extractor=other.extractor or self.extractor,
            # The row shortcut mirrors the preset's readers: a replaced reader voids it.
            rows=None if replaced else self.rows,
        )


Decoding = Parsed | BodyError | None
"""One body, decoded once: its JSON, why it is not JSON, or None (nothing to parse)."""

DecodedExtractor = Callable[[Decoding, Decoding], Extraction]
"""extract(request, response) on bodies already decoded; never raises on bad payloads."""


def decode_body(message: Message, decoder: Decoder) -> Decoding:
    try:
        decoded = decoder(message)
    except BodyError as exc:
        return exc
    return decoded if isinstance(decoded, Parsed) else None


def assemble(plan: Plan) -> Extractor:
    """The per-request function. A side with no readers is never parsed."""
    if plan.extractor is not None:
        return plan.extractor
    read = assemble_decoded(plan)
    reads_request, reads_response = plan.features is not None, _reads_response(plan)
    decode_request, decode_response = plan.decode_request, plan.decode_response

    def extract(request: Message, response: Message) -> Extraction:
        return read(
            decode_body(request, decode_request) if reads_request else None,
            decode_body(response, decode_response) if reads_response else None,
        )

    return extract


def assemble_decoded(plan: Plan) -> DecodedExtractor:
    """The plan's readers applied to bodies decoded once (see `assemble`, and the batch reader,
    which decodes every body of a batch before it knows which ones it can merge)."""
    read_features, read_outputs = plan.features, plan.outputs
    read_name, read_version = plan.model_name, plan.model_version
    reads_response = _reads_response(plan)

    def extract(request: Decoding, response: Decoding) -> Extraction:
        errors: list[ErrorType] = []
        features = None
        if read_features is not None:
            features = _request_side(request, read_features, errors)
        outputs, name, version = Outputs(), None, None
        if reads_response:
            parsed = _parsed(response, "response_parse", errors)
            if parsed is not None:
                outputs = _guarded(read_outputs, parsed.value, errors) or Outputs()
                name = _guarded(read_name, parsed.value, errors)
                version = _guarded(read_version, parsed.value, errors)
        return _finish(features, outputs, name, version, errors)

    return extract


def _reads_response(plan: Plan) -> bool:
    return any(r is not None for r in (plan.outputs, plan.model_name, plan.model_version))


def _request_side(
    request: Decoding, reader: FeatureReader, errors: list[ErrorType]
) -> FeatureTable | None:
    parsed = _parsed(request, "request_parse", errors)
    if parsed is None:
        return None
    try:
        return reader(parsed)
    except BAD_PAYLOAD:
        errors.append("mapping")
        return None


def _parsed(decoding: Decoding, error: ErrorType, errors: list[ErrorType]) -> Parsed | None:
    """The parsed body, or None (noting `error` when the body was not JSON)."""
    if isinstance(decoding, BodyError):
        errors.append(error)
        return None
    return decoding


def _guarded(reader: Callable[[Any], _T] | None, value: Any, errors: list[ErrorType]) -> _T | None:
    if reader is None:
        return None
    try:
        return reader(value)
    except BAD_PAYLOAD:
        errors.append("mapping")
        return None


def _finish(
    features: FeatureTable | None,
    outputs: Outputs,
    name: str | None,
    version: str | None,
    errors: list[ErrorType],
) -> Extraction:
    lengths = {
        len(a) for a in (outputs.classes, outputs.confidence, outputs.value) if a is not None
    }
    if len(lengths) > 1:  # e.g. 3 classes but 2 confidences: no row of them can be trusted
        errors.append("mapping")
        outputs, lengths = Outputs(), set()
    n_outputs = lengths.pop() if lengths else None
    if features is not None and n_outputs is not None and features.n_rows != n_outputs:
        errors.append("mapping")
    batch = features.n_rows if features is not None else (n_outputs or 0)
    return Extraction(
        features=features,
        outputs=outputs,
        batch_size=batch,
        model_name=name,
        model_version=version,
        errors=tuple(dict.fromkeys(errors)),
    )
