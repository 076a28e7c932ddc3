"""MLflow `mlflow models serve`: POST /invocations with one of four pandas-style layouts.

CSV and parquet bodies are valid input that we do not parse (their Content-Type says so).
"""

from __future__ import annotations

from typing import Any

from sidecar.extract.body import Parsed
from sidecar.extract.errors import MappingError
from sidecar.extract.navigate import list_at, member, rows_at
from sidecar.extract.plan import Plan, Rows, Vocabulary
from sidecar.extract.predictions import read_predictions
from sidecar.extract.presets.base import Preset, PresetRoute, ReadyCheck
from sidecar.extract.tables import rows_block, table_from_value
from sidecar.extract.types import FeatureTable, Outputs

__all__ = ["PRESET"]

_LAYOUTS = ("dataframe_records", "instances", "inputs")


def make_plan(vocabulary: Vocabulary) -> Plan:
    names, classes = vocabulary.feature_names, vocabulary.classes

    def features(parsed: Parsed) -> FeatureTable:
        body, check = parsed.value, parsed.may_hold_booleans
        if isinstance(body, dict) and "dataframe_split" in body:
            split = body["dataframe_split"]
            rows = rows_block(member(split, "data"), check_booleans=check)
            return rows.named(split.get("columns") or names)
        for key in _LAYOUTS:
            if isinstance(body, dict) and key in body:
                return table_from_value(body[key], names, check_booleans=check)
        msg = "no dataframe_split, dataframe_records, instances or inputs in the request"
        raise MappingError(msg)

    def outputs(body: Any) -> Outputs:
        return read_predictions(member(body, "predictions"), classes)

    def feature_rows(body: Any) -> list[Any] | None:
        if isinstance(body, dict) and "dataframe_split" in body:
            return None  # its columns come with each request
        return rows_at(body, _LAYOUTS)

    def prediction_rows(body: Any) -> list[Any] | None:
        return list_at(body, "predictions")

    rows = Rows.common(vocabulary, feature_rows, prediction_rows)
    return Plan(features=features, outputs=outputs, rows=rows)


PRESET = Preset(
    name="mlflow",
    routes=(PresetRoute("invocations", "POST", "/invocations"),),
    health=ReadyCheck("/ping"),  # one model per server: up is loaded
    make_plan=make_plan,
)
