"""OpenAI-compatible LLM servers (vLLM, TGI, llama.cpp, Ollama): chat completions, completions and
embeddings, streamed as server-sent events or not.

The reply is read after it went out, from the sidecar's copy: a stream's events are timed by when
their bytes arrived (`Message.arrivals`). Token counts come from `usage` only (the reply of a
non-streamed call, or the stream's chunk with empty `choices`); a reply without usage says so and
nothing is estimated. Request features are the prompt's length in characters, the prompt tokens
when the reply reported them, and the request fields the route names in `feature_names`
(e.g. `model`, `temperature`), so that drift and data-quality checks see prompts without storing
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from sidecar.extract.body import Parsed, decode
from sidecar.extract.errors import BodyError
from sidecar.extract.navigate import text
from sidecar.extract.plan import Plan, Vocabulary
from sidecar.extract.presets.base import Preset, PresetRoute, ReadyCheck
from sidecar.extract.sse import split_events
from sidecar.extract.tables import records_table
from sidecar.extract.types import (
    ErrorType,
    Extraction,
    Extractor,
    FeatureTable,
    Generation,
    Message,
    Outputs,
)

__all__ = ["PRESET", "make_extractor"]

_DONE = b"[DONE]"
# Fields of a chat message (or stream delta) that hold generated text.
_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def make_plan(vocabulary: Vocabulary) -> Plan:
    return Plan(extractor=make_extractor(vocabulary.feature_names or ()))


def make_extractor(request_fields: Sequence[str] = ()) -> Extractor:
    """The openai extractor; `request_fields` (dotted paths such as `stream_options.include_usage`
    are allowed) become feature columns under their own names."""
    paths = tuple((name, name.split(".")) for name in request_fields)

    def extract(request: Message, response: Message) -> Extraction:
        errors: list[ErrorType] = []
        body = _request_body(request, errors)
        prompt = _read_prompt(body, errors) if body is not None else None
        reply = _read_reply(response, errors)
        generation = _generation(body, prompt, reply)
        features = None
        if body is not None and prompt is not None:
            features = _features(body, prompt, reply, paths)
        return Extraction(
            features=features,
            outputs=Outputs(),
            batch_size=prompt.count if prompt is not None else 0,
            model_name=generation.model_name,
            errors=tuple(dict.fromkeys(errors)),
            generation=generation,
        )

    return extract


@dataclass(frozen=True, slots=True)
class _Prompt:
    count: int  # prompts in the request (a completions or embeddings call may send several)
    chars: int | None  # None when the prompt came as token ids


@dataclass(slots=True)
class _Reply:
    """What the reply said, streamed or not."""

    streamed: bool = False
    model: str | None = None
    usage: dict[str, Any] | None = None
    finish_reasons: list[str] = field(default_factory=list)
    chars: int = 0
    outputs: int = 0  # choices or events that carried generated text
    output_times: NDArray[np.float64] | None = None  # arrival of each output event (streams)


def _request_body(request: Message, errors: list[ErrorType]) -> dict[str, Any] | None:
    parsed = _decode(request, "request_parse", errors)
    if parsed is None:
        return None
    if not isinstance(parsed.value, dict):
        errors.append("mapping")
        return None
    return parsed.value


def _decode(message: Message, error: ErrorType, errors: list[ErrorType]) -> Parsed | None:
    try:
        parsed = decode(message)
    except BodyError:
        errors.append(error)
        return None
    return parsed if isinstance(parsed, Parsed) else None


def _read_prompt(body: dict[str, Any], errors: list[ErrorType]) -> _Prompt | None:
    """Chat `messages`, completions `prompt` or embeddings `input`."""
    if "messages" in body:
        messages = body["messages"]
        if isinstance(messages, list):
            return _Prompt(1, sum(_message_chars(message) for message in messages))
    else:
        value = body.get("prompt", body.get("input"))
        if isinstance(value, str):
            return _Prompt(1, len(value))
        if isinstance(value, list) and value:
            return _prompt_list(value)
    errors.append("mapping")
    return None


def _message_chars(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # parts: text, images, audio; only text has a length
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _prompt_list(value: list[Any]) -> _Prompt:
    """A list of strings (several prompts), of token ids (one prompt), or of token-id lists."""
    if all(isinstance(item, str) for item in value):
        return _Prompt(len(value), sum(len(item) for item in value))
    if isinstance(value[0], list):
        return _Prompt(len(value), None)
    return _Prompt(1, None)


def _read_reply(response: Message, errors: list[ErrorType]) -> _Reply:
    content_type = response.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() == "text/event-stream":
        return _read_stream(response, errors)
    parsed = _decode(response, "response_parse", errors)
    reply = _Reply()
    if parsed is None:
        return reply
    if not isinstance(parsed.value, dict):
        errors.append("mapping")
        return reply
    _read_chunk(parsed.value, reply, "message")
    return reply


def _read_stream(response: Message, errors: list[ErrorType]) -> _Reply:
    reply = _Reply(streamed=True)
    if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
        return reply  # compressed streams are relayed, not read
    ends = []
    unreadable = False
    for event in split_events(response.body):
        if event.data is None or event.data.strip() == _DONE:
            continue
        try:
            chunk = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            unreadable = True
            continue
        if not isinstance(chunk, dict):
            unreadable = True
            continue
        before = reply.outputs
        _read_chunk(chunk, reply, "delta")
        if reply.outputs > before:
            ends.append(event.end)
    if unreadable:
        errors.append("response_parse")
    reply.output_times = _arrival_times(ends, response.arrivals)
    return reply


def _read_chunk(chunk: dict[str, Any], reply: _Reply, key: str) -> None:
    """One response object or stream chunk: choices (`key` is "message" or "delta"), usage,
    model. An `error` object in a stream (vLLM sends one when generation fails) finishes it."""
    if reply.model is None:
        reply.model = text(chunk.get("model"))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        reply.usage = usage  # with continuous usage stats, the last one holds the totals
    if isinstance(chunk.get("error"), dict):
        reply.finish_reasons.append("error")
    choices = chunk.get("choices")
    if not isinstance(choices, list):  # some servers send null in the usage chunk
        return
    produced = False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        chars = _choice_chars(choice, key)
        if chars is not None:
            reply.chars += chars
            produced = True
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            reply.finish_reasons.append(reason)
    if produced:
        reply.outputs += 1


def _choice_chars(choice: dict[str, Any], key: str) -> int | None:
    """Characters of output in one choice; None when it carried no output at all.

    A role-only delta or an empty string is no output; a tool call is output with no text.
    """
    completion = choice.get("text")
    if isinstance(completion, str):  # /v1/completions
        return len(completion) if completion else None
    message = choice.get(key)
    if not isinstance(message, dict):
        return None
    chars = sum(len(v) for f in _TEXT_FIELDS if isinstance(v := message.get(f), str))
    if chars or message.get("tool_calls") or message.get("function_call"):
        return chars
    return None


def _arrival_times(ends: list[int], arrivals: Sequence[tuple[int, float]]) -> NDArray[np.float64]:
    """When each event was complete: the arrival of the piece that brought its last byte."""
    if not ends or not arrivals:
        return np.zeros(0)
    table = np.asarray(arrivals, dtype=np.float64)
    index = np.searchsorted(table[:, 0], np.asarray(ends, dtype=np.float64), side="left")
    if index[-1] >= len(table):  # the timings do not cover the body: do not guess
        return np.zeros(0)
    times: NDArray[np.float64] = table[index, 1]
    return times


def _generation(body: dict[str, Any] | None, prompt: _Prompt | None, reply: _Reply) -> Generation:
    usage = reply.usage or {}
    prompt_tokens = _count(usage.get("prompt_tokens"))
    completion_tokens = _count(usage.get("completion_tokens"))
    times = reply.output_times
    streamed = reply.streamed or (body is not None and body.get("stream") is True)
    return Generation(
        model_name=(text(body.get("model")) if body is not None else None) or reply.model,
        streamed=streamed,
        ttft=float(times[0]) if times is not None and times.size else None,
        token_gaps=np.diff(times) if times is not None and times.size > 1 else np.zeros(0),
        usage_known=prompt_tokens is not None,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens if prompt_tokens is not None else None,
        finish_reasons=tuple(reply.finish_reasons),
        prompt_chars=prompt.chars if prompt is not None else None,
        completion_chars=reply.chars if reply.outputs or reply.finish_reasons else None,
    )


def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _features(
    body: dict[str, Any],
    prompt: _Prompt,
    reply: _Reply,
    paths: tuple[tuple[str, list[str]], ...],
) -> FeatureTable:
    record: dict[str, Any] = {"prompt_chars": prompt.chars}
    tokens = _count((reply.usage or {}).get("prompt_tokens"))
    if tokens is not None:
        record["prompt_tokens"] = tokens
    for name, path in paths:
        record[name] = _lookup(body, path)
    return records_table([record], check_booleans=True)


def _lookup(value: Any, path: list[str]) -> Any:
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _lists_the_model(body: Any, model: str) -> bool:
    """`{"object": "list", "data": [{"id": "gpt-4o", "object": "model"}, ...]}` names `model`."""
    entries = body.get("data") if isinstance(body, dict) else None
    return isinstance(entries, list) and any(
        isinstance(entry, dict) and entry.get("id") == model for entry in entries
    )


PRESET = Preset(
    name="openai",
    routes=(
        PresetRoute("chat-completions", "POST", "/v1/chat/completions"),
        PresetRoute("completions", "POST", "/v1/completions"),
        PresetRoute("embeddings", "POST", "/v1/embeddings"),
    ),
    health=ReadyCheck("/v1/models"),
    make_plan=make_plan,
    generative=True,
    # The protocol has no model status; a served model is one the list names (vLLM lists its
    # --served-model-name; Ollama and llama.cpp the models they have).
    model_ready=(
        ReadyCheck("/v1/models", says_ready=_lists_the_model, expects="the model in its list"),
    ),
)
