"""build_extractor: a route's preset and mapping config turned, once, into one extractor function
(and build_readers: that, with its reader for many small exchanges at once).

Every decision (which preset, which expressions, which names) is taken here at startup; the
function returned only reads payloads.
"""

from __future__ import annotations

from sidecar.extract.batch import BatchReader, batch_reader
from sidecar.extract.custom import mapping_plan
from sidecar.extract.plan import Plan, Vocabulary, assemble
from sidecar.extract.predictions import ClassNames
from sidecar.extract.presets import get_preset
from sidecar.extract.spec import MappingSpec
from sidecar.extract.types import Extractor

__all__ = ["build_extractor", "build_readers"]


def build_extractor(preset: str | None, mapping: MappingSpec | None) -> Extractor:
    """The extractor for a route.

    `preset` names a protocol (see `sidecar.extract.presets.PRESETS`); `mapping` adds names
    (`class_names`, `feature_names`) and JMESPaths that replace the preset's readers: `features`,
    `model_name` and `model_version` each replace their own, while the output keys (`class`,
    `confidence`, `probabilities`, `value`) replace the preset's output reading as a group.
    With neither, the extractor reads nothing. Unknown preset: ValueError.
    """
    return assemble(_plan(preset, mapping))


def build_readers(
    preset: str | None, mapping: MappingSpec | None
) -> tuple[Extractor, BatchReader | None]:
    """The route's extractor, and its reader for many small exchanges at once
    (sidecar.extract.batch): None when its plan has no row shortcut (custom expressions,
    tensors, LLM calls). Both come from one plan."""
    plan = _plan(preset, mapping)
    return assemble(plan), batch_reader(plan)


def _plan(preset: str | None, mapping: MappingSpec | None) -> Plan:
    vocabulary = Vocabulary()
    if mapping is not None:
        vocabulary = Vocabulary(mapping.feature_names, ClassNames(mapping.class_names))
    plan = Plan() if preset is None else get_preset(preset).make_plan(vocabulary)
    if mapping is not None:
        plan = plan.overlay(mapping_plan(mapping, vocabulary))
    return plan
