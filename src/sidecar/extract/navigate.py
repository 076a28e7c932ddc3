"""Checked steps into untrusted JSON: a wrong shape becomes a MappingError with a reason."""

from __future__ import annotations

from typing import Any

from sidecar.extract.errors import MappingError

__all__ = ["member", "text"]


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
