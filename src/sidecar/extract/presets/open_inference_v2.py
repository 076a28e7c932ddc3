"""Open Inference Protocol / KServe V2 (MLServer, Triton, KServe): POST /v2/models/{model}/infer.

Tensors come as `data` (nested or flat, row-major) plus `shape`. The pandas codec sends one input
per column. Servers name outputs differently (MLServer `predict`/`predict_proba`, KServe `output-0`,
skl2onnx `output_label`/`output_probability`), so outputs are picked by name, else by position.
Triton binary-tensor bodies are skipped by the body reader (their header says so).
"""

from __future__ import annotations

from typing import Any, Final

from numpy.typing import NDArray

from sidecar.extract.batch import MAX_MERGED_ROWS
from sidecar.extract.body import Parsed
from sidecar.extract.errors import MappingError
from sidecar.extract.navigate import member, single_tensor_rows, text
from sidecar.extract.plan import Plan, Rows, Vocabulary
from sidecar.extract.predictions import ClassNames, combine, read_predictions, tensor_rows
from sidecar.extract.presets.base import Preset, PresetRoute, ReadyCheck
from sidecar.extract.tables import join, tensor_block
from sidecar.extract.types import FeatureTable, Outputs
from sidecar.oip import INFER, STREAM_INFER, route_name

__all__ = ["CLASS_OUTPUTS", "PRESET", "PROBABILITY_OUTPUTS"]

CLASS_OUTPUTS: Final = ("predict", "output_label", "label", "labels")
PROBABILITY_OUTPUTS: Final = ("predict_proba", "output_probability", "probabilities", "probability")


def make_plan(vocabulary: Vocabulary) -> Plan:
    names, classes = vocabulary.feature_names, vocabulary.classes

    def features(parsed: Parsed) -> FeatureTable:
        body, check = parsed.value, parsed.may_hold_booleans
        inputs = _tensors(member(body, "inputs"))
        blocks = [
            tensor_block(member(t, "data"), t.get("shape"), check_booleans=check) for t in inputs
        ]
        if len(blocks) == 1 and not _pandas(body):
            return blocks[0].named(names)
        # Several inputs (or the pandas codec): each input is a column, or a group of columns.
        columns: list[str] = []
        for position, (tensor, block) in enumerate(zip(inputs, blocks, strict=True)):
            label = str(tensor.get("name", position))
            columns += (
                [label] if block.width == 1 else [f"{label}[{j}]" for j in range(block.width)]
            )
        return join(blocks).named(columns)

    def outputs(body: Any) -> Outputs:
        return _read_outputs(_tensors(member(body, "outputs")), classes)

    def model_name(body: Any) -> str | None:
        return text(body.get("model_name")) if isinstance(body, dict) else None

    def model_version(body: Any) -> str | None:
        return text(body.get("model_version")) if isinstance(body, dict) else None

    def feature_rows(body: Any) -> list[Any] | None:
        if not isinstance(body, dict) or _pandas(body):
            return None
        rows = single_tensor_rows(body.get("inputs"), MAX_MERGED_ROWS)
        # One-value rows of shape [n] are a column: read alone, as tensor_block reads them.
        return rows if rows is not None and isinstance(rows[0], list) else None

    def prediction_rows(body: Any) -> list[Any] | None:
        return (
            single_tensor_rows(body.get("outputs"), MAX_MERGED_ROWS)
            if isinstance(body, dict)
            else None
        )

    return Plan(
        features=features,
        outputs=outputs,
        model_name=model_name,
        model_version=model_version,
        rows=Rows.common(vocabulary, feature_rows, prediction_rows),
    )


def _pandas(body: dict[str, Any]) -> bool:
    parameters = body.get("parameters")
    return isinstance(parameters, dict) and parameters.get("content_type") == "pd"


def _read_outputs(tensors: list[dict[str, Any]], classes: ClassNames) -> Outputs:
    by_name = {tensor.get("name"): tensor for tensor in tensors}
    predicted = next((by_name[n] for n in CLASS_OUTPUTS if n in by_name), None)
    ranked = next((by_name[n] for n in PROBABILITY_OUTPUTS if n in by_name), None)
    if predicted is not None and ranked is not None:
        return combine(
            read_predictions(_rows(predicted), classes), read_predictions(_rows(ranked), classes)
        )
    chosen = predicted or ranked or (tensors[0] if tensors else None)
    if chosen is None:
        msg = "the response has no outputs"
        raise MappingError(msg)
    return read_predictions(_rows(chosen), classes)


def _rows(tensor: dict[str, Any]) -> NDArray[Any]:
    return tensor_rows(member(tensor, "data"), tensor.get("shape"))


def _tensors(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        msg = "inputs/outputs must be a list of tensor objects"
        raise MappingError(msg)
    return value


PRESET = Preset(
    name="open-inference-v2",
    routes=(
        PresetRoute("infer", "POST", "/v2/models/{model}/infer"),
        PresetRoute("infer-version", "POST", "/v2/models/{model}/versions/{version}/infer"),
        # Over gRPC (docs/grpc.md): the relay names the model from the message.
        PresetRoute(route_name(INFER), "POST", INFER),
        PresetRoute(route_name(STREAM_INFER), "POST", STREAM_INFER),
    ),
    health=ReadyCheck("/v2/health/ready"),
    make_plan=make_plan,
    # The protocol's model-ready endpoint: 200 ready, 4xx not (or not known). No version: a model
    # without one in the path is served by the version the server picks, and model_version is a
    # label, which need not be a version the server knows.
    model_ready=(ReadyCheck("/v2/models/{model}/ready"),),
)
