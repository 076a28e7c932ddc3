"""The mapping config of one route: where features, outputs and model labels sit in the JSON.

Every JMESPath is compiled when the config is decoded, so a typo fails at startup with the config
path attached by msgspec (e.g. "... - at `$.routes[0].mapping`"), never on the first request.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jmespath
import jmespath.functions
import msgspec
from jmespath.parser import ParsedResult

__all__ = ["EXPRESSION_FIELDS", "MappingSpec", "compile_expression"]

# Attribute names (not YAML keys) of the MappingSpec fields that hold JMESPath expressions.
EXPRESSION_FIELDS = (
    "features",
    "class_",
    "confidence",
    "probabilities",
    "value",
    "model_name",
    "model_version",
)

_FUNCTIONS = jmespath.functions.Functions().FUNCTION_TABLE


class MappingSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where one route's payloads keep their features, outputs and model labels. All keys optional.

    `features`, `class`, `confidence`, `probabilities`, `value` point into the parsed request
    (`features`) or response (the rest); `model_name` and `model_version` point into the response.
    `feature_names` names positional feature columns; `class_names` maps class indices and
    probability columns to labels.
    """

    features: str | None = None
    feature_names: tuple[str, ...] | None = None
    class_: str | None = msgspec.field(default=None, name="class")
    confidence: str | None = None
    probabilities: str | None = None
    class_names: tuple[str, ...] | None = None
    value: str | None = None
    model_name: str | None = None
    model_version: str | None = None

    def __post_init__(self) -> None:
        for name in EXPRESSION_FIELDS:
            expression = getattr(self, name)
            if expression is not None:
                compile_expression(expression)

    def expressions(self) -> dict[str, ParsedResult]:
        """The compiled expressions that are set, by attribute name ("class_", "value", ...)."""
        return {
            name: compile_expression(getattr(self, name))
            for name in EXPRESSION_FIELDS
            if getattr(self, name) is not None
        }


# Cached so that MappingSpec can validate in __post_init__ and compile.py can fetch the same
# compiled object later without storing it on the frozen Struct. Keys are config strings, so the
# cache stays as small as the config.
@cache
def compile_expression(expression: str) -> ParsedResult:
    """Compile a JMESPath once; raise ValueError naming the expression and what is wrong with it."""
    try:
        parsed = jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        reason = str(exc).split("\n", 1)[0].removesuffix(", for expression:").rstrip(":")
        msg = f"{expression!r} is not a valid JMESPath expression ({reason})"
        raise ValueError(msg) from None
    # jmespath looks functions up only when it calls them: a misspelt one would fail every request.
    problem = _function_problem(parsed.parsed)
    if problem is not None:
        msg = f"{expression!r} is not a valid JMESPath expression ({problem})"
        raise ValueError(msg)
    return parsed


def _function_problem(node: Any) -> str | None:
    """The first unknown function or wrong argument count in a parsed JMESPath tree, if any."""
    stack = [node]
    while stack:
        current = stack.pop()
        if current.get("type") == "function_expression":
            name, args = current["value"], current["children"]
            entry = _FUNCTIONS.get(name)
            if entry is None:
                return f"unknown function {name}()"
            signature = entry["signature"]
            variadic = any(arg.get("variadic") for arg in signature)
            if len(args) < len(signature) or (not variadic and len(args) > len(signature)):
                return f"{name}() takes {len(signature)} argument(s), got {len(args)}"
        stack.extend(child for child in current.get("children", ()) if isinstance(child, dict))
    return None
