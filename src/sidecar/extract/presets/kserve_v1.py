"""KServe V1 (TF-Serving style) REST: POST /v1/models/{model}:predict, `instances` or `inputs`."""

from __future__ import annotations

from typing import Any

from sidecar.extract.body import Parsed
from sidecar.extract.errors import MappingError
from sidecar.extract.navigate import list_at, member, rows_at
from sidecar.extract.plan import Plan, Rows, Vocabulary
from sidecar.extract.predictions import read_predictions
from sidecar.extract.presets.base import Preset, PresetRoute, ReadyCheck
from sidecar.extract.tables import table_from_value
from sidecar.extract.types import FeatureTable, Outputs

__all__ = ["PRESET"]

_LAYOUTS = ("instances", "inputs")


def make_plan(vocabulary: Vocabulary) -> Plan:
    names, classes = vocabulary.feature_names, vocabulary.classes

    def features(parsed: Parsed) -> FeatureTable:
        body = parsed.value
        for key in _LAYOUTS:
            if isinstance(body, dict) and key in body:
                return table_from_value(body[key], names, check_booleans=parsed.may_hold_booleans)
        msg = "no instances or inputs in the request"
        raise MappingError(msg)

    def outputs(body: Any) -> Outputs:
        return read_predictions(member(body, "predictions"), classes)

    def feature_rows(body: Any) -> list[Any] | None:
        return rows_at(body, _LAYOUTS)

    def prediction_rows(body: Any) -> list[Any] | None:
        return list_at(body, "predictions")

    rows = Rows.common(vocabulary, feature_rows, prediction_rows)
    return Plan(features=features, outputs=outputs, rows=rows)


def _lists_a_model(body: Any, model: str) -> bool:
    """`/v1/models` answers 200 `{"models": []}` before any model has loaded."""
    return bool(list_at(body, "models"))


def _model_is_ready(body: Any, model: str) -> bool:
    """`/v1/models/{name}`: `{"name": "iris", "ready": true}` (KServe answers 503 while loading)."""
    return isinstance(body, dict) and body.get("ready") is True


PRESET = Preset(
    name="kserve-v1",
    # The model name and the verb share one segment: `{model}` stops at the colon.
    routes=(PresetRoute("predict", "POST", "/v1/models/{model}:predict"),),
    health=ReadyCheck("/v1/models", says_ready=_lists_a_model, expects="a model in its list"),
    make_plan=make_plan,
    model_ready=(
        ReadyCheck("/v1/models/{model}", says_ready=_model_is_ready, expects='"ready": true'),
    ),
)
