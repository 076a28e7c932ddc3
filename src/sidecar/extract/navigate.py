"""Checked steps into untrusted JSON: a wrong shape becomes a MappingError with a reason."""

from __future__ import annotations

from typing import Any

from sidecar.extract.errors import MappingError

__all__ = ["member", "non_empty_list", "row_list", "rows_at", "text"]


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
