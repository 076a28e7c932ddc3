"""The preset registry: one module per model-server protocol, looked up by name."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from sidecar.extract.presets import (
    kserve_v1,
    mlflow,
    open_inference_v2,
    openai,
    seldon_v1,
    torchserve,
)
from sidecar.extract.presets.base import Preset, PresetRoute

__all__ = ["PRESETS", "Preset", "PresetRoute", "get_preset"]

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        preset.name: preset
        for preset in (
            mlflow.PRESET,
            kserve_v1.PRESET,
            open_inference_v2.PRESET,
            seldon_v1.PRESET,
            torchserve.PRESET,
            openai.PRESET,
        )
    }
)


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        msg = f"unknown preset {name!r}; known presets: {known}"
        raise ValueError(msg) from None
