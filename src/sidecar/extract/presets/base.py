"""What a preset is: the routes a model server serves, its readiness path, and its reading plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sidecar.extract.plan import Plan, Vocabulary

__all__ = ["Preset", "PresetRoute"]


@dataclass(frozen=True, slots=True)
class PresetRoute:
    """One inference endpoint. `path` uses `{param}` segments; `{model}` and `{version}` name the
    model and its version (the router feeds them to the model_name/model_version labels)."""

    name: str
    method: str
    path: str


@dataclass(frozen=True, slots=True)
class Preset:
    """A model-server protocol: its inference routes, its readiness path, and how to read it.

    `make_plan` is called once per route at build time with the names from the route's config.
    A generative (LLM) protocol sets `generative`: its streams cut short are counted, its routes
    may have the proxy ask for token usage (`inject_usage`, docs/llm.md), and it reads its own
    payloads, so a mapping may name only request fields (`feature_names`).
    """

    name: str
    routes: tuple[PresetRoute, ...]
    health_path: str
    make_plan: Callable[[Vocabulary], Plan]
    generative: bool = False
