"""The openai preset and the LLM recorder, without sockets: fixtures and crafted payloads in,
Generation, features and metrics out."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from sidecar.config import Config, RouteConfig
from sidecar.extract import MappingSpec, Message, build_extractor
from sidecar.extract.types import Generation
from sidecar.recorders.labels import OverflowCounter
from sidecar.recorders.llm import LlmRecorder
from tests.fixtures_util import exchange

OPENAI = build_extractor("openai", None)
SSE = {"content-type": "text/event-stream; charset=utf-8"}
JSON = {"content-type": "application/json"}


def chat_request(**extra: Any) -> Message:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], **extra}
    return Message(json.dumps(body).encode(), JSON)


def stream(*chunks: Any, done: bool = True) -> bytes:
    events = [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks]
    return b"".join(events) + (b"data: [DONE]\n\n" if done else b"")


def delta(content: str | None = None, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    piece = {"content": content, **fields} if content is not None else fields
    return {"choices": [{"index": 0, "delta": piece, "finish_reason": finish}], "usage": None}


def timed(body: bytes, times: list[float]) -> Message:
    """The body as if each event had arrived on its own, at the given times."""
    ends = [i + 2 for i in range(len(body)) if body[i : i + 2] == b"\n\n"]
    assert len(ends) == len(times)
    return Message(body, SSE, list(zip(ends, times, strict=True)))


class TestFixtures:
    @pytest.mark.parametrize(
        ("name", "prompt_chars", "tokens", "reason", "completion_chars"),
        [
            ("chat_completion", 43, (14, 3), "stop", len("Iris setosa.")),
            ("chat_completion_stream", 43, (14, 3), "stop", len("Iris setosa.")),
            ("completion", 44, (9, 3), "length", len(" Iris setosa.")),
        ],
    )
    def test_documented_exchanges(
        self,
        name: str,
        prompt_chars: int,
        tokens: tuple[int, int],
        reason: str,
        completion_chars: int,
    ):
        """Model, usage, finish reason and lengths, streamed and not, as the fixtures hold them."""
        item = exchange("openai", name)

        result = OPENAI(item.request, item.response)

        generation = result.generation
        assert generation is not None
        assert result.errors == ()
        assert result.model_name == generation.model_name == "gpt-3.5-turbo-0125"
        assert (generation.prompt_tokens, generation.completion_tokens) == tokens
        assert generation.usage_known
        assert generation.finish_reasons == (reason,)
        assert generation.prompt_chars == prompt_chars
        assert generation.completion_chars == completion_chars
        assert generation.streamed == name.endswith("stream")
        assert result.features is not None
        assert result.features.columns == ("prompt_chars", "prompt_tokens")
        assert result.features.numeric.tolist() == [[prompt_chars, tokens[0]]]

    def test_stream_times_come_from_the_arrivals(self):
        """TTFT is the first content event (not the role chunk); gaps are between content events."""
        body = exchange("openai", "chat_completion_stream").response.body
        times = [0.01, 0.2, 0.25, 0.4, 0.41, 0.42, 0.43]  # role, 3 pieces, finish, usage, DONE

        generation = OPENAI(chat_request(stream=True), timed(body, times)).generation

        assert generation is not None
        assert generation.ttft == 0.2
        assert generation.token_gaps.tolist() == pytest.approx([0.05, 0.15])

    def test_events_sharing_a_network_read_share_its_time(self):
        """Two events that came in one piece both count at that piece's arrival."""
        body = stream(delta("a"), delta("b"), delta("c"))
        split = body.index(b"data: ", 1)  # the first event alone, then the rest at once
        arrivals = [(split, 0.1), (len(body), 0.3)]

        generation = OPENAI(chat_request(), Message(body, SSE, arrivals)).generation

        assert generation is not None
        assert generation.ttft == 0.1
        assert generation.token_gaps.tolist() == pytest.approx([0.2, 0.0])

    def test_stream_without_arrivals_has_no_times(self):
        """No timings, no guess."""
        generation = OPENAI(chat_request(), Message(stream(delta("a")), SSE)).generation

        assert generation is not None
        assert generation.ttft is None
        assert generation.token_gaps.size == 0


class TestStreams:
    def test_stream_without_usage_says_so(self):
        """A stream without usage: tokens unknown, and prompt_tokens is no feature column."""
        body = stream(delta("", role="assistant"), delta("Hi"), delta(finish="stop"))

        result = OPENAI(chat_request(stream=True), Message(body, SSE))

        assert result.generation is not None
        assert not result.generation.usage_known
        assert result.generation.prompt_tokens is None
        assert result.generation.completion_tokens is None
        assert result.generation.finish_reasons == ("stop",)
        assert result.features is not None
        assert result.features.columns == ("prompt_chars",)

    def test_reasoning_and_tool_calls_are_output(self):
        """Reasoning text and tool-call deltas count as output events; a role delta does not."""
        body = stream(
            delta("", role="assistant"),
            delta(reasoning_content="think"),
            delta(tool_calls=[{"index": 0, "function": {"arguments": "{}"}}]),
            delta(finish="tool_calls"),
        )
        times = [0.1, 0.2, 0.3, 0.4, 0.5]

        generation = OPENAI(chat_request(), timed(body, times)).generation

        assert generation is not None
        assert generation.ttft == 0.2
        assert generation.token_gaps.tolist() == pytest.approx([0.1])
        assert generation.completion_chars == len("think")
        assert generation.finish_reasons == ("tool_calls",)

    def test_several_choices_each_finish(self):
        """n > 1: one finish reason per choice."""
        chunk = {
            "choices": [
                {"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"},
                {"index": 1, "delta": {"content": "bb"}, "finish_reason": "length"},
            ]
        }

        generation = OPENAI(chat_request(n=2), Message(stream(chunk), SSE)).generation

        assert generation is not None
        assert generation.finish_reasons == ("stop", "length")
        assert generation.completion_chars == 3

    def test_completions_stream_and_null_choices_in_the_usage_chunk(self):
        """`text` pieces; a usage chunk with `choices: null` (some backends) is read too."""
        request = Message(b'{"model": "m", "prompt": "abc", "stream": true}', JSON)
        body = stream(
            {"choices": [{"index": 0, "text": "x", "finish_reason": None}]},
            {"choices": [{"index": 0, "text": "y", "finish_reason": "length"}]},
            {"choices": None, "usage": {"prompt_tokens": 2, "completion_tokens": 2}},
        )

        generation = OPENAI(request, Message(body, SSE)).generation

        assert generation is not None
        assert (generation.prompt_tokens, generation.completion_tokens) == (2, 2)
        assert generation.completion_chars == 2
        assert generation.prompt_chars == 3

    def test_error_event_finishes_the_stream_as_error(self):
        """vLLM reports a failed generation as an error object in the stream."""
        body = stream(delta("a"), {"error": {"message": "boom", "code": 500}})

        generation = OPENAI(chat_request(), Message(body, SSE)).generation

        assert generation is not None
        assert generation.finish_reasons == ("error",)

    def test_unreadable_event_is_a_response_parse_error_and_the_rest_is_kept(self):
        """One event that is not JSON is reported; the others still count."""
        body = b"data: {oops\n\n" + stream(delta("a", finish="stop"))

        result = OPENAI(chat_request(), Message(body, SSE))

        assert result.errors == ("response_parse",)
        assert result.generation is not None
        assert result.generation.finish_reasons == ("stop",)

    def test_keep_alive_comments_are_ignored(self):
        """`: ping` lines between events are no events and no error."""
        body = b": ping\n\n" + stream(delta("a"))

        result = OPENAI(chat_request(), Message(body, SSE))

        assert result.errors == ()
        assert result.generation is not None
        assert result.generation.completion_chars == 1


class TestRequests:
    def test_multimodal_chat_counts_text_parts_only(self):
        """Images have no characters; text parts of every message add up."""
        messages = [
            {"role": "system", "content": "abc"},
            {"role": "user", "content": [{"type": "text", "text": "de"}, {"type": "image_url"}]},
            {"role": "assistant", "content": None, "tool_calls": []},
        ]
        request = Message(json.dumps({"model": "m", "messages": messages}).encode(), JSON)

        generation = OPENAI(request, Message(b"", JSON)).generation

        assert generation is not None
        assert generation.prompt_chars == 5

    @pytest.mark.parametrize(
        ("prompt", "count", "chars"),
        [("abc", 1, 3), (["ab", "c"], 2, 3), ([1, 2, 3], 1, None), ([[1], [2, 3]], 2, None)],
    )
    def test_prompt_forms(self, prompt: Any, count: int, chars: int | None):
        """A string, several strings, token ids, several token-id lists."""
        request = Message(json.dumps({"model": "m", "prompt": prompt}).encode(), JSON)

        result = OPENAI(request, Message(b"", JSON))

        assert result.batch_size == count
        assert result.generation is not None
        assert result.generation.prompt_chars == chars

    def test_embeddings(self):
        """Embeddings: input length and prompt tokens; nothing generated, nothing finished."""
        request = Message(b'{"model": "e", "input": ["ab", "cde"]}', JSON)
        reply = {
            "object": "list",
            "data": [{"index": 0, "embedding": [0.1]}, {"index": 1, "embedding": [0.2]}],
            "model": "e",
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        }

        result = OPENAI(request, Message(json.dumps(reply).encode(), JSON))

        generation = result.generation
        assert generation is not None
        assert (generation.prompt_tokens, generation.completion_tokens) == (4, None)
        assert generation.usage_known
        assert generation.finish_reasons == ()
        assert generation.completion_chars is None
        assert result.batch_size == 2

    def test_configured_request_fields_become_features(self):
        """feature_names pick request fields (dotted paths allowed); absent ones are missing."""
        extract = build_extractor(
            "openai", MappingSpec(feature_names=("model", "temperature", "stream_options.x", "n"))
        )
        request = chat_request(temperature=0.7, stream_options={"x": True})

        result = extract(request, Message(b"", JSON))

        table = result.features
        assert table is not None
        assert table.columns == ("prompt_chars", "model", "temperature", "stream_options.x", "n")
        assert table.numeric[0, 0] == 5
        assert table.numeric[0, 2] == 0.7
        assert table.strings["model"].tolist() == ["m"]
        assert table.missing.tolist() == [[False, False, False, False, True]]

    def test_request_model_missing_falls_back_to_the_reply(self):
        """Servers that serve one model accept requests without `model`; the reply names it."""
        request = Message(b'{"messages": []}', JSON)
        reply = Message(b'{"model": "served", "choices": []}', JSON)

        assert OPENAI(request, reply).model_name == "served"

    @pytest.mark.parametrize(
        ("request_body", "response_body", "errors"),
        [
            (b"{nope", b"{}", ("request_parse",)),
            (b'{"model": "m", "messages": []}', b"Internal Server Error", ("response_parse",)),
            (b"[1]", b"{}", ("mapping",)),
            (b'{"model": "m"}', b"{}", ("mapping",)),
            (b'{"model": "m", "prompt": "a"}', b"[]", ("mapping",)),
            (b"[" * 100_000, b"[" * 100_000, ("request_parse", "response_parse")),
        ],
    )
    def test_bad_payloads_are_reported_never_raised(
        self, request_body: bytes, response_body: bytes, errors: tuple[str, ...]
    ):
        """Every failure is an error type, as for the other presets."""
        result = OPENAI(Message(request_body, {}), Message(response_body, {}))

        assert result.errors == errors
        assert result.generation is not None


class TestRecorder:
    def test_every_series_from_one_streamed_call(self):
        """TTFT, gaps, tokens, finish reasons and lengths land under the model and route."""
        registry = CollectorRegistry()
        recorder = LlmRecorder(registry, overflow=OverflowCounter(registry), label_cap=5)
        generation = Generation(
            model_name="m",
            streamed=True,
            ttft=0.2,
            token_gaps=np.array([0.05, 0.05, 0.1]),
            usage_known=True,
            prompt_tokens=14,
            completion_tokens=4,
            finish_reasons=("stop",),
            prompt_chars=40,
            completion_chars=12,
        )

        recorder.record(("m", "v1"), "chat", generation)

        labels = {"model_name": "m", "model_version": "v1", "route": "chat"}

        def value(name: str, **extra: str) -> float | None:
            return registry.get_sample_value(name, {**labels, **extra})

        assert value("ml_time_to_first_token_seconds_sum") == 0.2
        assert value("ml_time_per_output_token_seconds_count") == 3
        assert value("ml_time_per_output_token_seconds_sum") == pytest.approx(0.2)
        assert value("ml_time_per_output_token_seconds_bucket", le="0.05") == 2
        assert value("ml_tokens_total", kind="prompt") == 14
        assert value("ml_tokens_total", kind="completion") == 4
        assert value("ml_tokens_unreported_total") == 0
        assert value("ml_finish_reason_total", reason="stop") == 1
        assert value("ml_prompt_length_chars_sum") == 40
        assert value("ml_prompt_length_tokens_sum") == 14
        assert value("ml_completion_length_chars_sum") == 12
        assert value("ml_completion_length_tokens_sum") == 4

    def test_unknown_usage_is_counted_not_guessed(self):
        """No usage: one count in ml_tokens_unreported_total and no tokens."""
        registry = CollectorRegistry()
        recorder = LlmRecorder(registry, overflow=OverflowCounter(registry), label_cap=5)

        recorder.record(("m", "v"), "chat", Generation(streamed=True, prompt_chars=3))

        labels = {"model_name": "m", "model_version": "v", "route": "chat"}
        assert registry.get_sample_value("ml_tokens_unreported_total", labels) == 1
        assert registry.get_sample_value("ml_tokens_total", {**labels, "kind": "prompt"}) == 0
        assert registry.get_sample_value("ml_time_to_first_token_seconds_count", labels) == 0

    def test_finish_reasons_are_capped(self):
        """Finish reasons come from the payload, so beyond label_cap they fold into __other__."""
        registry = CollectorRegistry()
        recorder = LlmRecorder(registry, overflow=OverflowCounter(registry), label_cap=2)

        for reason in ("stop", "length", "weird", "odd"):
            recorder.record(("m", "v"), "chat", Generation(finish_reasons=(reason,)))

        labels = {"model_name": "m", "model_version": "v", "route": "chat"}
        other = registry.get_sample_value(
            "ml_finish_reason_total", {**labels, "reason": "__other__"}
        )
        assert other == 2


class TestConfig:
    def test_inject_usage_needs_an_openai_route(self):
        """Rewriting requests is only meaningful for the openai protocol."""
        with pytest.raises(ValueError, match="no route uses the openai preset"):
            Config(upstream="http://127.0.0.1:1", preset="kserve-v1", inject_usage=True)
        with pytest.raises(ValueError, match="preset openai only"):
            RouteConfig(name="r", path="/x", preset="mlflow", inject_usage=True)

    def test_openai_mapping_takes_only_feature_names(self):
        """The preset reads its payloads itself: JMESPaths on an openai route would be ignored."""
        with pytest.raises(ValueError, match="only feature_names"):
            Config(upstream="http://127.0.0.1:1", preset="openai", mapping=MappingSpec(value="x"))
        Config(
            upstream="http://127.0.0.1:1",
            preset="openai",
            inject_usage=True,
            mapping=MappingSpec(feature_names=("model",)),
        )
