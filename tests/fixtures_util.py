"""Captured model-server traffic from tests/fixtures (its README says how it was captured), as
extraction `Message`s."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sidecar.extract.types import Message

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SERVERS = ("mlflow", "mlserver", "kserve", "torchserve", "openai")


@dataclass(frozen=True)
class Exchange:
    """One recorded request/response pair; header names lower-cased, bodies as UTF-8 bytes."""

    server: str
    name: str
    method: str
    path: str
    status: int
    request: Message
    response: Message
    notes: str

    @property
    def id(self) -> str:
        return f"{self.server}:{self.name}"

    def request_json(self) -> object:
        return json.loads(self.request.body)

    def response_json(self) -> object:
        return json.loads(self.response.body)


@cache
def load(server: str) -> tuple[Exchange, ...]:
    """Every exchange recorded from `server` (a fixture file stem such as "mlflow")."""
    document = json.loads((FIXTURES / f"{server}.json").read_text(encoding="utf-8"))
    return tuple(
        Exchange(
            server=server,
            name=item["name"],
            method=item["request"]["method"],
            path=item["request"]["path"],
            status=item["response"]["status"],
            request=_message(item["request"]),
            response=_message(item["response"]),
            notes=item.get("notes", ""),
        )
        for item in document["exchanges"]
    )


def exchange(server: str, name: str) -> Exchange:
    """The exchange called `name` in `server`'s fixture file."""
    for item in load(server):
        if item.name == name:
            return item
    raise KeyError(f"{server} has no exchange {name!r}")


def route_params(template: str, path: str) -> dict[str, str] | None:
    """Match a `{param}` path template (one segment, colon excluded) against a path."""
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/:]+)", re.escape(template))
    found = re.fullmatch(pattern, path)
    return None if found is None else found.groupdict()


def _message(side: dict[str, object]) -> Message:
    headers = side["headers"]
    body = side["body"]
    assert isinstance(headers, list)
    assert isinstance(body, str)
    return Message(body.encode("utf-8"), {name.lower(): value for name, value in headers})


def json_message(value: object, **headers: str) -> Message:
    """A message with `value` as its JSON body (NaN/Infinity allowed), header names lower-cased."""
    body = json.dumps(value, allow_nan=True).encode("utf-8")
    return Message(body, {name.lower().replace("_", "-"): text for name, text in headers.items()})
