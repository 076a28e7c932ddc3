"""The route table: (method, path template) -> a bounded route name, path parameters and extractor.

Templates use `{param}` segments, as in starlette: `/v2/models/{model}/infer` matches
`/v2/models/iris/infer` with params `{"model": "iris"}`. A raw path never becomes a label.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from sidecar.extract.batch import BatchReader
from sidecar.extract.types import Extractor

UNMATCHED = "other"

_PARAM = re.compile(r"\{([A-Za-z_]\w*)\}")
_NO_PARAMS: Mapping[str, str] = MappingProxyType({})


def compile_path(template: str) -> re.Pattern[str]:
    """`/v1/models/{model}:predict` -> `^/v1/models/(?P<model>[^/]+):predict$`."""
    parts = []
    position = 0
    for match in _PARAM.finditer(template):
        parts.append(re.escape(template[position : match.start()]))
        parts.append(f"(?P<{match[1]}>[^/]+?)")
        position = match.end()
    parts.append(re.escape(template[position:]))
    return re.compile("^" + "".join(parts) + "$")


@dataclass(frozen=True, slots=True, eq=False)  # one object per table entry: hashed by identity
class Route:
    name: str
    method: str  # upper case, or "*" for any
    template: str
    extractor: Extractor | None = None
    batch: BatchReader | None = None  # reads many small exchanges at once, when the plan can
    generative: bool = False  # an LLM route (a generative preset's): streams cut short count
    inject_usage: bool = False  # the proxy asks its streams for usage and hides it (docs/llm.md)
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", compile_path(self.template))


FALLBACK = Route(UNMATCHED, "*", "/{path}")


class RouteTable:
    """First matching route wins, in the order given; anything else is the `other` route."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = tuple(routes)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def match(self, method: str, path: str) -> tuple[Route, Mapping[str, str]]:
        for route in self._routes:
            if route.method not in ("*", method):
                continue
            found = route.pattern.match(path)
            if found is not None:
                return route, (found.groupdict() or _NO_PARAMS)
        return FALLBACK, _NO_PARAMS
