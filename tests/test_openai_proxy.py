"""LLM traffic through the real proxy: a streaming OpenAI-style upstream on an ephemeral port with
scripted delays, and the metrics the sidecar derives from what passed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.config import FeatureRule, RouteConfig
from sidecar.extract import MappingSpec
from sidecar.extract.types import Generation
from sidecar.recorders.llm import LlmRecorder
from tests.conftest import StartSidecar, assert_sample, sample, settled

MODEL = "tiny-llm"
PROMPT = "Which iris species has the smallest petals?"
PROMPT_TOKENS = 14


@dataclass
class Script:
    """How the fake server answers streamed calls."""

    pieces: tuple[str, ...] = ("Iris", " setosa", ".")
    first: float = 0.0  # seconds before the first piece (after the role chunk)
    gaps: tuple[float, ...] = ()  # seconds before each later piece
    lockstep: list[asyncio.Event] | None = None  # piece i waits for lockstep[i] (i >= 1)
    cut_after: int | None = None  # abort the connection after this many pieces
    hang: bool = False  # after the pieces, wait for the proxy to hang up


@dataclass
class FakeLLM:
    """An OpenAI-compatible server: chat completions (streamed or not), completions, embeddings.

    Like vLLM, it sends the usage chunk only when the request asks for it. `seen` holds the
    request bodies it got, `sent` the exact bytes of each stream it wrote.
    """

    url: str = ""
    script: Script = field(default_factory=Script)
    seen: list[bytes] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET":  # the readiness probe: GET /v1/models
            return web.json_response({"object": "list", "data": [{"id": MODEL}]})
        raw = await request.read()
        self.seen.append(raw)
        body = json.loads(raw)
        if request.path == "/v1/embeddings":
            return web.json_response(embedding_reply(body))
        if body.get("stream"):
            return await self.stream(request, body)
        return web.json_response(chat_reply(body))

    async def stream(self, request: web.BaseRequest, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sent = bytearray()
        self.sent.append(b"")
        script = self.script

        async def emit(chunk: dict[str, Any]) -> None:
            event = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
            sent.extend(event)
            self.sent[-1] = bytes(sent)
            await response.write(event)

        await emit(chunk_of({"role": "assistant", "content": ""}))
        for index, piece in enumerate(script.pieces):
            if index == script.cut_after:
                assert request.transport is not None
                request.transport.abort()
                return response
            await asyncio.sleep(script.first if index == 0 else _gap(script, index))
            if script.lockstep is not None and index > 0:
                await asyncio.wait_for(script.lockstep[index].wait(), timeout=10)
            await emit(chunk_of({"content": piece}))
        if script.hang:
            await self.wait_for_hang_up(request)
            return response
        await emit(chunk_of({}, finish="stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": len(script.pieces),
                "total_tokens": PROMPT_TOKENS + len(script.pieces),
            }
            await emit(
                {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage}
            )
        sent.extend(b"data: [DONE]\n\n")
        self.sent[-1] = bytes(sent)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def wait_for_hang_up(self, request: web.BaseRequest) -> None:
        for _ in range(1000):
            if request.transport is None or request.transport.is_closing():
                self.hung_up.set()
                return
            await asyncio.sleep(0.01)


def _gap(script: Script, index: int) -> float:
    return script.gaps[index - 1] if index - 1 < len(script.gaps) else 0.0


def chunk_of(piece: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": piece, "logprobs": None, "finish_reason": finish}],
    }


def chat_reply(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion",
        "model": body.get("model", MODEL),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Iris setosa."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 3, "total_tokens": 17},
    }


def embedding_reply(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
        "model": body.get("model", MODEL),
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    llm = FakeLLM()
    runner = web.ServerRunner(web.Server(llm.handle, access_log=None), shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    llm.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield llm
    await runner.cleanup()


@pytest.fixture
def generations(monkeypatch: pytest.MonkeyPatch) -> list[Generation]:
    """Every Generation the LLM recorder is handed, in order."""
    seen: list[Generation] = []
    original = LlmRecorder.record

    def spy(self: LlmRecorder, model: tuple[str, str], route: str, generation: Generation) -> None:
        seen.append(generation)
        original(self, model, route, generation)

    monkeypatch.setattr(LlmRecorder, "record", spy)
    return seen


def chat(stream: bool = True, usage: bool | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body["stream"] = True
    if usage is not None:
        body["stream_options"] = {"include_usage": usage}
    return {**body, **extra}


async def post(sidecar: Sidecar, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(sidecar.proxy_url + path, json=body) as response,
    ):
        return response.status, await response.read()


LLM = {"model_name": MODEL, "route": "chat-completions"}


async def test_ttft_and_inter_token_gaps_match_the_injected_delays(
    fake_llm: FakeLLM, start_sidecar: StartSidecar, generations: list[Generation]
):
    """The upstream waits 100 ms before the first piece, then 50, 100, 75 ms: so do the metrics."""
    fake_llm.script = Script(pieces=("a", "b", "c", "d"), first=0.1, gaps=(0.05, 0.1, 0.075))
    sidecar = await start_sidecar(fake_llm.url, preset="openai")

    status, _ = await post(sidecar, "/v1/chat/completions", chat(usage=True))

    assert status == 200
    text = await settled(sidecar, "ml_time_to_first_token_seconds_count", 1, **LLM)
    (generation,) = generations
    assert generation.ttft == pytest.approx(0.1, abs=0.005)
    assert generation.token_gaps.tolist() == pytest.approx([0.05, 0.1, 0.075], abs=0.005)
    ttft = sample(text, "ml_time_to_first_token_seconds_sum", **LLM)
    assert ttft == pytest.approx(0.1, abs=0.005)
    assert_sample(text, "ml_time_per_output_token_seconds_count", 3, **LLM)
    assert_sample(text, "ml_time_per_output_token_seconds_bucket", 0, le="0.04", **LLM)
    assert_sample(text, "ml_tokens_total", PROMPT_TOKENS, kind="prompt", **LLM)
    assert_sample(text, "ml_tokens_total", 4, kind="completion", **LLM)
    assert_sample(text, "ml_finish_reason_total", 1, reason="stop", **LLM)
    assert_sample(text, "ml_prompt_length_chars_sum", len(PROMPT), **LLM)
    assert_sample(text, "ml_completion_length_chars_sum", 4, **LLM)


async def test_client_gets_each_event_before_the_next_is_produced(
    fake_llm: FakeLLM, start_sidecar: StartSidecar
):
    """The upstream writes piece i+1 only after the client has read piece i through the proxy."""
    released = [asyncio.Event() for _ in range(4)]
    fake_llm.script = Script(pieces=("a", "b", "c", "d"), lockstep=released)
    sidecar = await start_sidecar(fake_llm.url, preset="openai")
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sidecar.proxy_url}/v1/chat/completions", json=chat()) as response,
    ):
        role = await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=10)
        assert b'"role":"assistant"' in role
        for index, piece in enumerate("abcd"):
            event = await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=10)
            assert json.loads(event[6:])["choices"][0]["delta"]["content"] == piece
            if index + 1 < len(released):
                released[index + 1].set()
        rest = await response.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_stream_without_usage_is_relayed_as_is_and_counted_as_unreported(
    fake_llm: FakeLLM, start_sidecar: StartSidecar
):
    """inject_usage off (the default): the bytes are the upstream's, and tokens stay unknown."""
    sidecar = await start_sidecar(fake_llm.url, preset="openai")

    status, received = await post(sidecar, "/v1/chat/completions", chat())

    assert status == 200
    assert received == fake_llm.sent[0]
    assert b"stream_options" not in fake_llm.seen[0]
    text = await settled(sidecar, "ml_tokens_unreported_total", 1, **LLM)
    assert_sample(text, "ml_tokens_total", 0, kind="prompt", **LLM)
    assert_sample(text, "ml_finish_reason_total", 1, reason="stop", **LLM)


async def test_inject_usage_counts_tokens_and_hides_the_usage_chunk(
    fake_llm: FakeLLM, start_sidecar: StartSidecar
):
    """The upstream is asked for usage; the client gets the stream less that one event."""
    sidecar = await start_sidecar(fake_llm.url, preset="openai", inject_usage=True)

    status, received = await post(sidecar, "/v1/chat/completions", chat())

    assert status == 200
    assert json.loads(fake_llm.seen[0])["stream_options"] == {"include_usage": True}
    usage_events = [e + b"\n\n" for e in fake_llm.sent[0].split(b"\n\n") if b'"choices":[]' in e]
    assert len(usage_events) == 1
    assert received == fake_llm.sent[0].replace(usage_events[0], b"")
    text = await settled(sidecar, "ml_tokens_total", PROMPT_TOKENS, kind="prompt", **LLM)
    assert_sample(text, "ml_tokens_total", 3, kind="completion", **LLM)
    assert_sample(text, "ml_tokens_unreported_total", 0, **LLM)


async def test_inject_usage_leaves_a_client_that_asked_for_usage_alone(
    fake_llm: FakeLLM, start_sidecar: StartSidecar
):
    """A request that already asks for usage is sent as it is, and its reply relayed as it is."""
    sidecar = await start_sidecar(fake_llm.url, preset="openai", inject_usage=True)
    body = chat(usage=True)

    status, received = await post(sidecar, "/v1/chat/completions", body)

    assert status == 200
    assert fake_llm.seen[0] == json.dumps(body).encode()
    assert received == fake_llm.sent[0]
    assert b'"choices":[]' in received


async def test_client_hanging_up_is_an_aborted_stream_and_cancels_upstream(
    fake_llm: FakeLLM, start_sidecar: StartSidecar
):
    """The client leaves after the first piece: the upstream sees the hang-up, and it counts."""
    fake_llm.script = Script(hang=True)
    sidecar = await start_sidecar(fake_llm.url, preset="openai")
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{sidecar.proxy_url}/v1/chat/completions", json=chat())
        await response.content.readuntil(b"\n\n")
        await response.content.readuntil(b"\n\n")
        response.close()
    await asyncio.wait_for(fake_llm.hung_up.wait(), timeout=10)
    text = await settled(sidecar, "ml_stream_aborted_total", 1, reason="client_disconnect", **LLM)
    assert not sample(text, "ml_time_to_first_token_seconds_count", **LLM)


async def test_upstream_cutting_the_stream_is_an_aborted_stream(
    fake_llm: FakeLLM, start_sidecar: StartSidecar
):
    """The model server drops the connection mid-stream: upstream_reset."""
    fake_llm.script = Script(cut_after=2)
    sidecar = await start_sidecar(fake_llm.url, preset="openai")

    with pytest.raises(aiohttp.ClientPayloadError):
        await post(sidecar, "/v1/chat/completions", chat())

    await settled(sidecar, "ml_stream_aborted_total", 1, reason="upstream_reset", **LLM)


async def test_non_streamed_chat_and_embeddings(fake_llm: FakeLLM, start_sidecar: StartSidecar):
    """Usage, finish reason and lengths from JSON replies; embeddings count prompt tokens only."""
    sidecar = await start_sidecar(fake_llm.url, preset="openai")

    assert (await post(sidecar, "/v1/chat/completions", chat(stream=False)))[0] == 200
    assert (await post(sidecar, "/v1/embeddings", {"model": MODEL, "input": "abc"}))[0] == 200

    embeddings = {"model_name": MODEL, "route": "embeddings"}
    text = await settled(sidecar, "ml_tokens_total", 8, kind="prompt", **embeddings)
    assert_sample(text, "ml_tokens_total", 0, kind="completion", **embeddings)
    assert_sample(text, "ml_tokens_total", PROMPT_TOKENS, kind="prompt", **LLM)
    assert_sample(text, "ml_tokens_total", 3, kind="completion", **LLM)
    assert_sample(text, "ml_finish_reason_total", 1, reason="stop", **LLM)
    assert_sample(text, "ml_completion_length_chars_sum", len("Iris setosa."), **LLM)
    assert_sample(text, "ml_time_to_first_token_seconds_count", 0, **LLM)


async def test_model_label_is_the_requested_model_within_the_allow_list(
    fake_llm: FakeLLM, start_sidecar: StartSidecar
):
    """LLM series name the requested model, folded to __other__ outside `model_names`; RED
    series of the route keep the configured model_name."""
    sidecar = await start_sidecar(
        fake_llm.url, preset="openai", model_name="llm-pod", model_names=(MODEL,)
    )

    await post(sidecar, "/v1/chat/completions", chat(stream=False))
    await post(sidecar, "/v1/chat/completions", chat(stream=False, model="someone-elses"))

    other = {"model_name": "__other__", "route": "chat-completions"}
    text = await settled(sidecar, "ml_tokens_total", PROMPT_TOKENS, kind="prompt", **other)
    assert_sample(text, "ml_tokens_total", PROMPT_TOKENS, kind="prompt", **LLM)
    red = {"model_name": "llm-pod", "route": "chat-completions"}
    assert_sample(text, "ml_requests_total", 2, code="200", **red)


async def test_prompt_features_reach_data_quality(fake_llm: FakeLLM, start_sidecar: StartSidecar):
    """Configured request fields are feature columns: an absent temperature is a missing cell,
    a categorical model name is no type error."""
    route = RouteConfig(
        name="chat",
        method="POST",
        path="/v1/chat/completions",
        preset="openai",
        mapping=MappingSpec(feature_names=("model", "temperature")),
    )
    sidecar = await start_sidecar(
        fake_llm.url,
        routes=(route,),
        features={"model": FeatureRule(type="categorical")},
    )

    await post(sidecar, "/v1/chat/completions", chat(stream=False))
    await post(sidecar, "/v1/chat/completions", chat(stream=False, temperature=0.2))

    text = await settled(sidecar, "ml_tokens_total", 2 * PROMPT_TOKENS, kind="prompt", route="chat")
    assert_sample(text, "ml_feature_missing_total", 1, feature="temperature")
    assert_sample(text, "ml_feature_invalid_total", None, feature="model")
