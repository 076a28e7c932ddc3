"""build_extractor: a route's preset and mapping config turned, once, into one extractor function.

Every decision (which preset, which expressions, which names) is taken here at startup; the
function returned only reads payloads.
"""

from __future__ import annotations

from sidecar.extract.custom import mapping_plan
from sidecar.extract.plan import Plan, Vocabulary, assemble
from sidecar.extract.predictions import ClassNames
from sidecar.extract.presets import get_preset
from sidecar.extract.spec import MappingSpec
from sidecar.extract.types import Extractor

__all__ = ["build_extractor"]


def build_extractor(preset: str | None, mapping: MappingSpec | None) -> Extractor:
    """The extractor for a route.

    `preset` names a protocol (see `sidecar.extract.presets.PRESETS`); `mapping` adds names
    (`class_names`, `feature_names`) and JMESPaths that replace the preset's readers: `features`,
    `model_name` and `model_version` each replace their own, while the output keys (`class`,
    `confidence`, `probabilities`, `value`) replace the preset's output reading as a group.
    With neither, the extractor reads nothing. Unknown preset: ValueError.
    """
    vocabulary = Vocabulary()
    if mapping is not None:
        vocabulary = Vocabulary(mapping.feature_names, ClassNames(mapping.class_names))
    plan = Plan() if preset is None else get_preset(preset).make_plan(vocabulary)
    if mapping is not None:
        plan = plan.overlay(mapping_plan(mapping, vocabulary))
    return assemble(plan)
