"""What a preset is: the routes a model server serves, what its readiness asks, and its reading
plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.extract.plan import Plan, Vocabulary

__all__ = ["Preset", "PresetRoute", "ReadyCheck"]


@dataclass(frozen=True, slots=True)
class PresetRoute:
    """One inference endpoint. `path` uses `{param}` segments; `{model}` and `{version}` name the
    model and its version (the router feeds them to the model_name/model_version labels)."""

    name: str
    method: str
    path: str


@dataclass(frozen=True, slots=True)
class ReadyCheck:
    """One request readiness sends the model server (sidecar.readiness): `method` on `path`, where
    `{model}` stands for the model's name. Ready when the answer is 2xx and, if `says_ready` is
    set, it holds of the answer's JSON (None when the body is not JSON) and the model's name (""
    in `health`, asked when no name is known). `expects` says what `says_ready` looks for, for
    /readyz's reason.
    """

    path: str
    method: str = "GET"
    says_ready: Callable[[Any, str], bool] | None = None
    expects: str = ""


@dataclass(frozen=True, slots=True)
class Preset:
    """A model-server protocol: its inference routes, what readiness asks, and how to read it.

    Readiness asks `health` when the model's name is not known, and every check of `model_ready`
    (all must say ready) when it is (sidecar.readiness.named_model): a server can be up with the
    model not loaded, and only a question that names the model tells. No `model_ready`: `health`
    says it all (a server of one model).

    `make_plan` is called once per route at build time with the names from the route's config.
    A generative (LLM) protocol sets `generative`: its streams cut short are counted, its routes
    may have the proxy ask for token usage (`inject_usage`, docs/llm.md), and it reads its own
    payloads, so a mapping may name only request fields (`feature_names`).
    """

    name: str
    routes: tuple[PresetRoute, ...]
    health: ReadyCheck
    make_plan: Callable[[Vocabulary], Plan]
    generative: bool = False
    model_ready: tuple[ReadyCheck, ...] = ()

    @property
    def health_path(self) -> str:
        return self.health.path
