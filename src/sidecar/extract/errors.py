"""Exceptions raised inside extraction; the assembled extractor turns them into `errors` entries."""

from __future__ import annotations

__all__ = ["BodyError", "MappingError"]


class BodyError(ValueError):
    """A body says it is JSON (or says nothing) but cannot be read as JSON."""


class MappingError(ValueError):
    """The JSON is valid, but features or outputs are not where (or how) the mapping expects."""
