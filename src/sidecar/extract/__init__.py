"""Extraction: features, outputs and model labels read from an exchange's request and response.

`build_extractor(preset, mapping)` gives a route its `Extractor`; `PRESETS` lists the protocols.
"""

from __future__ import annotations

from sidecar.extract.compile import build_extractor
from sidecar.extract.presets import PRESETS, Preset, PresetRoute
from sidecar.extract.spec import MappingSpec
from sidecar.extract.types import Extraction, Extractor, FeatureTable, Message, Outputs

__all__ = [
    "PRESETS",
    "Extraction",
    "Extractor",
    "FeatureTable",
    "MappingSpec",
    "Message",
    "Outputs",
    "Preset",
    "PresetRoute",
    "build_extractor",
]
