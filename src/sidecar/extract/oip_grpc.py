"""ModelInfer messages (Open Inference Protocol over gRPC) as the documents of its REST form.

A gRPC request becomes the JSON body the same call would have sent over HTTP: `model_name`,
`model_version`, `id`, `parameters`, and `inputs` (or `outputs`) as tensors with `name`,
`datatype`, `shape` and flat, row-major `data`, whether the message carried typed `contents` or
`raw_input_contents`. So the open-inference-v2 preset and every custom mapping read gRPC as they
read JSON (docs/grpc.md). This runs in the drain, after the reply went out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar

import numpy as np
from google.protobuf.message import DecodeError

from sidecar.extract.errors import BodyError
from sidecar.oip import REQUEST_TYPE, RESPONSE_TYPE
from sidecar.oip.oip_pb2 import (
    InferParameter,
    InferTensorContents,
    ModelInferRequest,
    ModelInferResponse,
)

__all__ = ["document", "holds_booleans"]

_Message = TypeVar("_Message", ModelInferRequest, ModelInferResponse)

# Raw contents: little-endian, row-major, no padding (the protocol's words).
_RAW_TYPES: Final = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip
# Typed contents: the repeated field that holds each datatype.
_CONTENT_FIELDS: Final = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}  # fmt: skip
_LENGTH_BYTES: Final = 4  # each element of a raw BYTES tensor: a little-endian uint32 length


class _Tensor(Protocol):
    """An input or output tensor of either message."""

    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def parameters(self) -> Mapping[str, InferParameter]: ...
    @property
    def contents(self) -> InferTensorContents: ...


def document(body: bytes, content_type: str) -> dict[str, Any] | None:
    """The REST document of a ModelInfer message that the relay labelled `content_type`; None
    for any other content type. BodyError when the bytes are not such a message."""
    if content_type == REQUEST_TYPE:
        request = _parse(ModelInferRequest, body)
        return _document(request, "inputs", request.inputs, request.raw_input_contents)
    if content_type == RESPONSE_TYPE:
        response = _parse(ModelInferResponse, body)
        return _document(response, "outputs", response.outputs, response.raw_output_contents)
    return None


def _document(
    message: ModelInferRequest | ModelInferResponse,
    key: str,
    tensors: Sequence[_Tensor],
    raw: Sequence[bytes],
) -> dict[str, Any]:
    if raw and len(raw) != len(tensors):
        msg = f"{len(raw)} raw contents for {len(tensors)} tensors"
        raise BodyError(msg)
    found: dict[str, Any] = {"model_name": message.model_name}
    if message.model_version:
        found["model_version"] = message.model_version
    if message.id:
        found["id"] = message.id
    if message.parameters:
        found["parameters"] = _parameters(message.parameters)
    found[key] = [
        _tensor(tensor, raw[position] if raw else None) for position, tensor in enumerate(tensors)
    ]
    return found


def holds_booleans(found: dict[str, Any]) -> bool:
    """Whether a document from `document` has a BOOL tensor (whose data are Python bools)."""
    tensors = found.get("inputs", found.get("outputs", ()))
    return any(tensor["datatype"] == "BOOL" for tensor in tensors)


def _parse(kind: type[_Message], body: bytes) -> _Message:
    try:
        return kind.FromString(body)
    except DecodeError as exc:
        msg = f"not a {kind.__name__} message: {exc}"
        raise BodyError(msg) from None


def _tensor(tensor: _Tensor, raw: bytes | None) -> dict[str, Any]:
    found: dict[str, Any] = {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.shape),
        "data": _raw_data(tensor.datatype, raw) if raw is not None else _typed_data(tensor),
    }
    if tensor.parameters:
        found["parameters"] = _parameters(tensor.parameters)
    return found


def _raw_data(datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        return _raw_strings(raw)
    if datatype == "BF16":  # the upper half of a float32
        halves = _frombuffer(raw, "<u2", datatype)
        return (halves.astype(np.uint32) << 16).view(np.float32).tolist()  # type: ignore[no-any-return]
    dtype = _RAW_TYPES.get(datatype)
    if dtype is None:
        msg = f"unknown datatype {datatype!r}"
        raise BodyError(msg)
    return _frombuffer(raw, dtype, datatype).tolist()  # type: ignore[no-any-return]


def _frombuffer(raw: bytes, dtype: str, datatype: str) -> np.ndarray[Any, Any]:
    try:
        return np.frombuffer(raw, dtype=dtype)
    except ValueError:
        msg = f"{len(raw)} raw bytes are not a whole number of {datatype} elements"
        raise BodyError(msg) from None


def _raw_strings(raw: bytes) -> list[str]:
    """A raw BYTES tensor: each element is its length (uint32, little-endian), then its bytes."""
    view = memoryview(raw)
    found: list[str] = []
    position = 0
    while position < len(view):
        if position + _LENGTH_BYTES > len(view):
            msg = "a raw BYTES tensor ends inside an element's length"
            raise BodyError(msg)
        length = int.from_bytes(view[position : position + _LENGTH_BYTES], "little")
        start = position + _LENGTH_BYTES
        if start + length > len(view):
            msg = "a raw BYTES tensor ends inside an element"
            raise BodyError(msg)
        found.append(bytes(view[start : start + length]).decode("utf-8", "replace"))
        position = start + length
    return found


def _typed_data(tensor: _Tensor) -> list[Any]:
    field = _CONTENT_FIELDS.get(tensor.datatype)
    if field is None:  # FP16 and BF16 travel raw only
        msg = f"datatype {tensor.datatype!r} has no typed contents"
        raise BodyError(msg)
    values = getattr(tensor.contents, field)
    if field == "bytes_contents":
        return [value.decode("utf-8", "replace") for value in values]
    return list(values)


def _parameters(parameters: Mapping[str, InferParameter]) -> dict[str, Any]:
    return {name: _parameter(value) for name, value in parameters.items()}


def _parameter(parameter: InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)
