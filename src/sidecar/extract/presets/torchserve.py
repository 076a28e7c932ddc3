"""TorchServe inference API: POST /predictions/{model}[/{version}], handler-defined JSON.

The built-in classifiers answer `{label: probability}` (a list of them for a batch), with no
Content-Type on 200 and pretty-printed. TorchServe also routes KServe V1 paths to the handler.
"""

from __future__ import annotations

from typing import Any

from sidecar.extract.body import Parsed
from sidecar.extract.navigate import non_empty_list, row_list, rows_at
from sidecar.extract.plan import Plan, Rows, Vocabulary
from sidecar.extract.predictions import read_predictions
from sidecar.extract.presets.base import Preset, PresetRoute, ReadyCheck
from sidecar.extract.tables import table_from_value
from sidecar.extract.types import FeatureTable, Outputs

__all__ = ["PRESET"]

# Common envelopes around the rows; any other JSON is taken as the rows, record or columns itself.
_ENVELOPES = ("instances", "inputs", "data")


def make_plan(vocabulary: Vocabulary) -> Plan:
    names, classes = vocabulary.feature_names, vocabulary.classes

    def features(parsed: Parsed) -> FeatureTable:
        body = parsed.value
        if isinstance(body, dict):
            key = next((key for key in _ENVELOPES if key in body), None)
            if key is not None:
                body = body[key]
        return table_from_value(body, names, check_booleans=parsed.may_hold_booleans)

    def outputs(body: Any) -> Outputs:
        return read_predictions(body, classes)

    def feature_rows(body: Any) -> list[Any] | None:
        return rows_at(body, _ENVELOPES) if isinstance(body, dict) else row_list(body)

    def prediction_rows(body: Any) -> list[Any] | None:
        return [body] if isinstance(body, dict) else non_empty_list(body)  # a dict is one row

    rows = Rows.common(vocabulary, feature_rows, prediction_rows)
    return Plan(features=features, outputs=outputs, rows=rows)


def _says_healthy(body: Any, model: str) -> bool:
    """`{"status": "Healthy"}`. Older releases answer "Partial Healthy" and "Unhealthy" with a
    200 too; recent ones answer "Unhealthy" with a 500."""
    return isinstance(body, dict) and body.get("status") == "Healthy"


_PING = ReadyCheck("/ping", says_ready=_says_healthy, expects='"status": "Healthy"')

PRESET = Preset(
    name="torchserve",
    routes=(
        PresetRoute("predictions", "POST", "/predictions/{model}"),
        PresetRoute("predictions-version", "POST", "/predictions/{model}/{version}"),
        PresetRoute("kserve-v1-predict", "POST", "/v1/models/{model}:predict"),
    ),
    health=_PING,
    make_plan=make_plan,
    # The inference port has no model status (that is the management API's GET /models/{name},
    # on another port, which a path on the upstream cannot reach). OPTIONS /predictions/{name}
    # answers the model's OpenAPI description without running it, or 404 when no such model is
    # registered (its archive failed to load: /ping alone stays Healthy, pytorch/serve#2099).
    # /ping covers the workers: it says Unhealthy (with a 500, or a 200 in older releases) while
    # a model has fewer healthy workers than its minWorkers.
    model_ready=(_PING, ReadyCheck("/predictions/{model}", method="OPTIONS")),
)
