"""Seldon Core v1 protocol: `{"data": {"names": [...], "ndarray": [...] | "tensor": {...}}}`.

Request `names` name the feature columns; response `names` name the probability columns (the
sklearnserver default is predict_proba). Free-form payloads (`jsonData`, `strData`, `binData`)
are valid and carry nothing we can read, so they yield nothing and no error.
"""

from __future__ import annotations

import re
from typing import Any, Final

from sidecar.extract.body import Parsed
from sidecar.extract.errors import MappingError
from sidecar.extract.navigate import member
from sidecar.extract.plan import Plan, Vocabulary
from sidecar.extract.predictions import ClassNames, read_predictions, tensor_rows
from sidecar.extract.presets.base import Preset, PresetRoute, ReadyCheck
from sidecar.extract.tables import Block, rows_block, tensor_block
from sidecar.extract.types import FeatureTable, Outputs

__all__ = ["PRESET"]

_FREE_FORM: Final = ("jsonData", "strData", "binData")
# Names the Seldon wrapper makes up when the model defines none: "t:0", "t:1", ...
_GENERATED_NAME: Final = re.compile(r"t:\d+")


def make_plan(vocabulary: Vocabulary) -> Plan:
    names, classes = vocabulary.feature_names, vocabulary.classes

    def features(parsed: Parsed) -> FeatureTable | None:
        body = parsed.value
        if isinstance(body, dict) and "data" not in body and any(k in body for k in _FREE_FORM):
            return None
        data = member(body, "data")
        block = _block(data, check_booleans=parsed.may_hold_booleans)
        return block.named(data.get("names") or names)

    def outputs(body: Any) -> Outputs:
        if isinstance(body, dict) and "data" not in body and any(k in body for k in _FREE_FORM):
            return Outputs()
        data = member(body, "data")
        block = _payload(data)
        return read_predictions(block, _class_names(data.get("names"), classes))

    return Plan(features=features, outputs=outputs)


def _block(data: Any, *, check_booleans: bool) -> Block:
    if isinstance(data, dict) and "ndarray" in data:
        return rows_block(_rows(data["ndarray"]), check_booleans=check_booleans)
    tensor = member(data, "tensor")
    return tensor_block(
        member(tensor, "values"), tensor.get("shape"), check_booleans=check_booleans
    )


def _payload(data: Any) -> Any:
    """The response rows: `ndarray` as sent, or `tensor.values` reshaped by `tensor.shape`."""
    if isinstance(data, dict) and "ndarray" in data:
        return data["ndarray"]
    tensor = member(data, "tensor")
    return tensor_rows(member(tensor, "values"), tensor.get("shape"))


def _rows(ndarray: Any) -> Any:
    if not isinstance(ndarray, list):
        msg = "data.ndarray is not an array"
        raise MappingError(msg)
    return ndarray


def _class_names(names: Any, configured: ClassNames) -> ClassNames:
    """Configured class names win; else the response's own names, unless Seldon generated them."""
    if configured.names is not None or not isinstance(names, list) or len(names) < 2:
        return configured
    if all(isinstance(n, str) and _GENERATED_NAME.fullmatch(n) for n in names):
        return configured
    return ClassNames([str(n) for n in names])


PRESET = Preset(
    name="seldon-v1",
    routes=(
        PresetRoute("predictions", "POST", "/api/v1.0/predictions"),
        PresetRoute("predictions-v0.1", "POST", "/api/v0.1/predictions"),
        PresetRoute("predict", "POST", "/predict"),
        PresetRoute(
            "ingress-predictions", "POST", "/seldon/{namespace}/{deployment}/api/v1.0/predictions"
        ),
    ),
    health=ReadyCheck("/health/ping"),  # one model per deployment
    make_plan=make_plan,
)
