"""Readers built from a route's JMESPath mapping (MappingSpec)."""

from __future__ import annotations

from typing import Any

from jmespath.parser import ParsedResult

from sidecar.extract.body import Parsed
from sidecar.extract.navigate import text
from sidecar.extract.plan import FeatureReader, OutputReader, Plan, TextReader, Vocabulary
from sidecar.extract.predictions import (
    ClassNames,
    combine,
    read_floats,
    read_predictions,
    read_probabilities,
)
from sidecar.extract.spec import MappingSpec
from sidecar.extract.tables import table_from_value
from sidecar.extract.types import FeatureTable, Outputs

__all__ = ["mapping_plan"]


def mapping_plan(spec: MappingSpec, vocabulary: Vocabulary) -> Plan:
    """A plan holding a reader for each expression the mapping sets, and None for the rest."""
    found = spec.expressions()
    has_outputs = any(key in found for key in ("class_", "confidence", "probabilities", "value"))
    return Plan(
        features=_features(found["features"], vocabulary) if "features" in found else None,
        outputs=_outputs(found, vocabulary.classes) if has_outputs else None,
        model_name=_text(found["model_name"]) if "model_name" in found else None,
        model_version=_text(found["model_version"]) if "model_version" in found else None,
    )


def _features(expression: ParsedResult, vocabulary: Vocabulary) -> FeatureReader:
    names = vocabulary.feature_names

    def read(parsed: Parsed) -> FeatureTable:
        found = expression.search(parsed.value)
        return table_from_value(found, names, check_booleans=parsed.may_hold_booleans)

    return read


def _outputs(found: dict[str, ParsedResult], classes: ClassNames) -> OutputReader:
    """Output keys are read as a group: `class` and `probabilities` give classes (and confidence),
    `confidence` and `value` are per-row numbers; an explicit key wins over a derived one."""
    klass, probabilities = found.get("class_"), found.get("probabilities")
    confidence, value = found.get("confidence"), found.get("value")

    def read(body: Any) -> Outputs:
        predicted = read_predictions(klass.search(body), classes) if klass else None
        ranked = read_probabilities(probabilities.search(body), classes) if probabilities else None
        if predicted is not None and ranked is not None:
            base = combine(predicted, ranked)
        else:
            base = predicted or ranked or Outputs()
        return Outputs(
            classes=base.classes,
            confidence=read_floats(confidence.search(body)) if confidence else base.confidence,
            value=read_floats(value.search(body)) if value else None,
        )

    return read


def _text(expression: ParsedResult) -> TextReader:
    def read(body: Any) -> str | None:
        return text(expression.search(body))

    return read
