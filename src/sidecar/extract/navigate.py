"""Checked steps into untrusted JSON: a wrong shape becomes a MappingError with a reason."""

from __future__ import annotations

from typing import Any

from sidecar.extract.errors import MappingError

__all__ = [
    "list_at",
    "member",
    "non_empty_list",
    "row_list",
    "rows_at",
    "single_tensor_rows",
    "text",
]


def member(value: Any, key: str) -> Any:
    """`value[key]` where `value` must be a JSON object holding `key`."""
    if not isinstance(value, dict):
        msg = f"expected an object with {key!r}, got {type(value).__name__}"
        raise MappingError(msg)
    if key not in value:
        msg = f"no {key!r} in the payload"
        raise MappingError(msg)
    return value[key]


def text(value: Any) -> str | None:
    """A label value (model name or version) as text; None for null, objects and arrays."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def rows_at(value: Any, keys: tuple[str, ...]) -> list[Any] | None:
    """The rows under the first of `keys` that `value` (an object) holds, if they are a plain
    row list (see row_list); else None."""
    if not isinstance(value, dict):
        return None
    for key in keys:
        if key in value:
            return row_list(value[key])
    return None


def row_list(value: Any) -> list[Any] | None:
    """`value` if it is a non-empty list of rows (lists) or records (objects), else None.

    A flat list is not taken: as features it is one row, as predictions one class per row, and
    only the plan's own readers know which.
    """
    if isinstance(value, list) and value and isinstance(value[0], list | dict):
        return value
    return None


def non_empty_list(value: Any) -> list[Any] | None:
    """`value` if it is a non-empty list, else None."""
    return value if isinstance(value, list) and value else None


def list_at(value: Any, key: str) -> list[Any] | None:
    """`value[key]` if `value` is an object holding a non-empty list there, else None."""
    return non_empty_list(value.get(key)) if isinstance(value, dict) else None


def single_tensor_rows(tensors: Any, max_rows: int) -> list[Any] | None:
    """The rows of the only tensor in `tensors` (a V2 `inputs` or `outputs` list), if it has at
    most `max_rows` rows and its `data` fits its `shape` exactly: [n] gives n values, [n, k]
    n rows of k (nested as sent, or cut from flat data). None for anything else."""
    if not isinstance(tensors, list) or len(tensors) != 1 or not isinstance(tensors[0], dict):
        return None
    data, shape = tensors[0].get("data"), tensors[0].get("shape")
    if not isinstance(data, list) or not data or not isinstance(shape, list):
        return None
    if not all(type(dim) is int for dim in shape) or not 0 < shape[0] <= max_rows:
        return None
    if len(shape) == 1:
        return data if len(data) == shape[0] and not isinstance(data[0], list) else None
    if len(shape) != 2 or shape[1] < 1:
        return None
    n, width = shape
    if isinstance(data[0], list):
        return data if len(data) == n and all(len(row) == width for row in data) else None
    if len(data) != n * width:
        return None
    return [data[i * width : (i + 1) * width] for i in range(n)]
