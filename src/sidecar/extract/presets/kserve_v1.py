"""KServe V1 (TF-Serving style) REST: POST /v1/models/{model}:predict, `instances` or `inputs`."""

from __future__ import annotations

from typing import Any

from sidecar.extract.body import Parsed
from sidecar.extract.errors import MappingError
from sidecar.extract.navigate import list_at, member, rows_at
from sidecar.extract.plan import Plan, Rows, Vocabulary
from sidecar.extract.predictions import read_predictions
from sidecar.extract.presets.base import Preset, PresetRoute
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


PRESET = Preset(
    name="kserve-v1",
    # The model name and the verb share one segment: `{model}` stops at the colon.
    routes=(PresetRoute("predict", "POST", "/v1/models/{model}:predict"),),
    health_path="/v1/models",
    make_plan=make_plan,
)
