"""The gRPC listener (sidecar.proxy.grpc_relay) between a real grpc.aio client and a canned
grpc.aio upstream (tests/grpc_upstream.py), all in process on ephemeral ports: what the client
gets, what the upstream sees, and what the metrics say, for failures, deadlines, cancellations,
streams, large messages, metadata, and messages that are not what the protocol says.

Clients and upstream pass messages as bytes (no serializers), so every comparison is of the
bytes on the wire. The relay of a real MLServer is in tests/test_grpc_mlserver.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc import aio

from sidecar.app import Sidecar
from sidecar.config import FeatureRule
from sidecar.oip import INFER, STREAM_INFER, route_name
from sidecar.oip.oip_pb2 import (
    ModelInferRequest,
    ModelInferResponse,
    ModelStreamInferResponse,
)
from sidecar.routes import UNMATCHED
from tests.conftest import CannedUpstream, StartSidecar, assert_sample, settled
from tests.grpc_upstream import (
    BIGGEST_MESSAGE,
    CannedGrpc,
    Context,
    UnaryScript,
    canned_grpc_server,
    iris_reply,
)

INFER_ROUTE = route_name(INFER)
STREAM_ROUTE = route_name(STREAM_INFER)
ECHO = "/test.Echo/Bidi"  # no OIP method: relayed as a stream, one exchange
COUNTDOWN = "/test.Echo/Countdown"  # one request, several replies
HOLD = "/test.Hold/Bidi"  # takes messages, never answers
MiB = 1024 * 1024
DEADLINE = 0.3  # seconds: the short deadlines and timeouts of these tests
LONG_ENOUGH = 10.0  # seconds an upstream stalls: far past any deadline here
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", BIGGEST_MESSAGE),
    ("grpc.max_send_message_length", BIGGEST_MESSAGE),
]

Metadata = tuple[tuple[str, str | bytes], ...]
StartRelay = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def canned_grpc() -> AsyncIterator[CannedGrpc]:
    async with canned_grpc_server() as canned:
        yield canned


@pytest.fixture
def start_relay(
    canned_upstream: CannedUpstream, canned_grpc: CannedGrpc, start_sidecar: StartSidecar
) -> StartRelay:
    """Start a sidecar relaying gRPC to the canned server (HTTP to the canned HTTP upstream),
    instrumented with the open-inference-v2 preset; `settings` are more config."""

    async def start(**settings: Any) -> Sidecar:
        settings.setdefault("grpc_upstream", canned_grpc.address)
        return await start_sidecar(
            canned_upstream.url,
            grpc_port=0,
            preset="open-inference-v2",
            health_path="/health",
            **settings,
        )

    return start


@pytest.fixture
async def relay(start_relay: StartRelay) -> Sidecar:
    return await start_relay()


@contextlib.asynccontextmanager
async def channel_to(sidecar: Sidecar) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(sidecar.grpc_address, options=CLIENT_OPTIONS) as channel:
        yield channel


# The channel's methods, without serializers: bytes each way.


def unary(channel: aio.Channel, path: str) -> aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(path)


def server_stream(channel: aio.Channel, path: str) -> aio.UnaryStreamMultiCallable[bytes, bytes]:
    return channel.unary_stream(path)


def bidi(channel: aio.Channel, path: str) -> aio.StreamStreamMultiCallable[bytes, bytes]:
    return channel.stream_stream(path)


async def infer(sidecar: Sidecar, request: bytes, **options: Any) -> bytes:
    """One ModelInfer through the sidecar."""
    async with channel_to(sidecar) as channel:
        return await unary(channel, INFER)(request, **options)


def answering(reply: bytes) -> UnaryScript:
    """An upstream method that answers `reply` to any request."""

    async def answer(request: bytes, context: Context) -> bytes:
        return reply

    return answer


def iris_request(row: Iterable[float] = (5.1, 3.5, 1.4, 0.2)) -> ModelInferRequest:
    """A ModelInferRequest of one iris row (4 FP64 features), in typed contents."""
    request = ModelInferRequest(model_name="iris", id="call")
    tensor = request.inputs.add(name="input-0", datatype="FP64", shape=[1, 4])
    tensor.contents.fp64_contents.extend(row)
    return request


IRIS = iris_request().SerializeToString()


async def stall(request: bytes, context: Context) -> bytes:
    """An upstream that does not answer in any test's time (unless its call is cancelled)."""
    await asyncio.sleep(LONG_ENOUGH)
    return b"too late"


async def hold(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
    """A stream that takes every message and answers none."""
    async for _ in requests:
        pass
    await asyncio.sleep(LONG_ENOUGH)
    yield b"too late"


def metadata_of(found: Iterable[tuple[str, str | bytes]] | None) -> Metadata:
    """Metadata as a tuple of (key, value), in the order it came."""
    return tuple((key, value) for key, value in found or ())


def value_of(metadata: Metadata, key: str) -> str | bytes | None:
    return next((value for name, value in metadata if name == key), None)


# Failures of the upstream


async def test_nothing_listening_upstream_is_unavailable_and_counted_unreachable(
    start_relay: StartRelay, refusing_url: str
) -> None:
    sidecar = await start_relay(grpc_upstream=refusing_url.removeprefix("http://"))

    with pytest.raises(aio.AioRpcError) as failed:
        await infer(sidecar, IRIS, timeout=5)

    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    text = await settled(
        sidecar, "ml_errors_total", 1, route=INFER_ROUTE, error_type="upstream_unreachable"
    )
    assert_sample(text, "ml_requests_total", 1, model_name="iris", code="UNAVAILABLE")


async def test_client_deadline_cancels_the_upstream_call_and_counts_a_timeout(
    relay: Sidecar, canned_grpc: CannedGrpc
) -> None:
    canned_grpc.unary[INFER] = stall
    started = time.perf_counter()

    with pytest.raises(aio.AioRpcError) as failed:
        await infer(relay, IRIS, timeout=DEADLINE)

    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - started < LONG_ENOUGH / 2
    seen = await canned_grpc.call_to(INFER)
    assert await seen.ended_cancelled()
    text = await settled(
        relay, "ml_errors_total", 1, route=INFER_ROUTE, error_type="upstream_timeout"
    )
    assert_sample(text, "ml_requests_total", 1, route=INFER_ROUTE, code="DEADLINE_EXCEEDED")
    assert_sample(text, "ml_errors_total", None, error_type="client_disconnect")


async def test_upstream_timeout_bounds_a_call_without_a_deadline(
    start_relay: StartRelay, canned_grpc: CannedGrpc
) -> None:
    sidecar = await start_relay(upstream_timeout=DEADLINE)
    canned_grpc.unary[INFER] = stall

    with pytest.raises(aio.AioRpcError) as failed:
        await infer(sidecar, IRIS)  # no deadline of the client's own

    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await (await canned_grpc.call_to(INFER)).ended_cancelled()
    text = await settled(
        sidecar, "ml_errors_total", 1, route=INFER_ROUTE, error_type="upstream_timeout"
    )
    assert_sample(text, "ml_requests_total", 1, route=INFER_ROUTE, code="DEADLINE_EXCEEDED")


async def test_client_deadline_on_a_stream_cancels_the_upstream_and_counts_a_timeout(
    relay: Sidecar, canned_grpc: CannedGrpc
) -> None:
    canned_grpc.streams[STREAM_INFER] = hold
    async with channel_to(relay) as channel:
        call = bidi(channel, STREAM_INFER)(iter([IRIS]), timeout=DEADLINE)

        with pytest.raises(aio.AioRpcError) as failed:
            await call.read()

    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await (await canned_grpc.call_to(STREAM_INFER)).ended_cancelled()
    # The one request in flight is the inference that timed out.
    text = await settled(
        relay, "ml_errors_total", 1, route=STREAM_ROUTE, error_type="upstream_timeout"
    )
    assert_sample(text, "ml_requests_total", 1, route=STREAM_ROUTE, code="DEADLINE_EXCEEDED")
    assert_sample(text, "ml_errors_total", None, error_type="client_disconnect")


# Cancellation by the client


async def test_client_cancelling_a_unary_call_cancels_the_upstream_call(
    relay: Sidecar, canned_grpc: CannedGrpc
) -> None:
    canned_grpc.unary[INFER] = stall
    async with channel_to(relay) as channel:
        call = unary(channel, INFER)(IRIS)
        seen = await canned_grpc.call_to(INFER)  # the call is in flight, upstream
        call.cancel()

        assert await call.code() == grpc.StatusCode.CANCELLED
    assert await seen.ended_cancelled()
    text = await settled(
        relay, "ml_errors_total", 1, route=INFER_ROUTE, error_type="client_disconnect"
    )
    assert_sample(text, "ml_requests_total", 1, route=INFER_ROUTE, code="CANCELLED")


@pytest.mark.parametrize(("path", "route"), [(STREAM_INFER, STREAM_ROUTE), (HOLD, UNMATCHED)])
async def test_client_cancelling_a_stream_cancels_the_upstream_call(
    relay: Sidecar, canned_grpc: CannedGrpc, path: str, route: str
) -> None:
    canned_grpc.streams[path] = hold
    async with channel_to(relay) as channel:
        call = bidi(channel, path)()
        await call.write(IRIS)
        seen = await canned_grpc.call_to(path)
        await asyncio.wait_for(seen.arrived.wait(), 5)  # the message is upstream, unanswered
        call.cancel()

        assert await call.code() == grpc.StatusCode.CANCELLED
    assert await seen.ended_cancelled()
    assert seen.requests == [IRIS]
    # ModelStreamInfer: the message in flight is the one inference cut short; another method's
    # stream is one exchange.
    text = await settled(relay, "ml_errors_total", 1, route=route, error_type="client_disconnect")
    assert_sample(text, "ml_requests_total", 1, route=route, code="CANCELLED")


# Streams


async def test_server_stream_is_relayed_message_by_message(
    relay: Sidecar, canned_grpc: CannedGrpc
) -> None:
    replies = [b"", b"\x00\xff" * 3, b"three", bytes(range(256)) * 40]

    async def countdown(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        async for _ in requests:  # the one request: then the replies
            pass
        for reply in replies:
            yield reply

    canned_grpc.streams[COUNTDOWN] = countdown
    async with channel_to(relay) as channel:
        got = [reply async for reply in server_stream(channel, COUNTDOWN)(b"start", timeout=5)]

    assert got == replies
    assert (await canned_grpc.call_to(COUNTDOWN)).requests == [b"start"]
    text = await settled(relay, "ml_requests_total", 1, route=UNMATCHED, code="OK")
    assert_sample(text, "ml_errors_total", None, route=UNMATCHED)


async def test_stream_failing_midway_relays_its_messages_then_its_status(
    relay: Sidecar, canned_grpc: CannedGrpc
) -> None:
    async def two_then_fail(
        requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        await context.send_initial_metadata((("x-served-by", "canned"),))
        yield b"first"
        yield b"second"
        trailers = (("x-quota-bin", b"\x00\x02"),)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota spent", trailers)

    canned_grpc.streams[COUNTDOWN] = two_then_fail
    async with channel_to(relay) as channel:
        call = server_stream(channel, COUNTDOWN)(b"start", timeout=5)
        got = [await call.read(), await call.read()]
        with pytest.raises(aio.AioRpcError) as failed:
            await call.read()
        initial = metadata_of(await call.initial_metadata())

    assert got == [b"first", b"second"]
    error = failed.value
    assert (error.code(), error.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "quota spent")
    assert metadata_of(error.trailing_metadata()) == (("x-quota-bin", b"\x00\x02"),)
    assert value_of(initial, "x-served-by") == "canned"
    assert value_of(initial, "x-request-id")
    await settled(relay, "ml_requests_total", 1, route=UNMATCHED, code="RESOURCE_EXHAUSTED")


async def test_bidi_stream_answers_each_message_before_the_next_is_sent(
    relay: Sidecar, canned_grpc: CannedGrpc
) -> None:
    messages = [b"one", b"", b"\x00\x01\x02", b"four" * 1000]

    async def numbered(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        position = 0
        async for request in requests:
            yield bytes([position]) + request[::-1]
            position += 1

    canned_grpc.streams[ECHO] = numbered
    async with channel_to(relay) as channel:
        call = bidi(channel, ECHO)(timeout=5)
        got = []
        for message in messages:  # lockstep: a relay that waited for more would hang here
            await call.write(message)
            got.append(await call.read())
        await call.done_writing()
        assert await call.read() is aio.EOF
        assert await call.code() == grpc.StatusCode.OK

    assert got == [bytes([n]) + message[::-1] for n, message in enumerate(messages)]
    assert (await canned_grpc.call_to(ECHO)).requests == messages
    await settled(relay, "ml_requests_total", 1, route=UNMATCHED, code="OK")


async def test_stream_infer_pairs_each_request_with_its_reply_as_one_inference(
    relay: Sidecar, canned_grpc: CannedGrpc
) -> None:
    requests = [iris_request([5.1, 3.5, 1.4, float(n)]).SerializeToString() for n in range(3)]
    async with channel_to(relay) as channel:
        call = bidi(channel, STREAM_INFER)(iter(requests), timeout=5)
        got = [reply async for reply in call]

    # The canned model answers class 0, 1, 2 in turn.
    expected = [ModelStreamInferResponse(infer_response=iris_reply([n])) for n in range(3)]
    assert got == [reply.SerializeToString() for reply in expected]
    assert (await canned_grpc.call_to(STREAM_INFER)).requests == requests
    text = await settled(relay, "ml_requests_total", 3, route=STREAM_ROUTE, code="OK")
    for label in ("0", "1", "2"):
        assert_sample(text, "ml_predictions_total", 1, model_name="iris", **{"class": label})
    assert_sample(text, "ml_errors_total", None, route=STREAM_ROUTE)


# Large messages


async def test_message_of_20_mib_passes_both_ways(relay: Sidecar, canned_grpc: CannedGrpc) -> None:
    rng = np.random.default_rng(16)
    request = ModelInferRequest(model_name="iris")  # an image, say: over gRPC's default 4 MiB
    request.inputs.add(name="input-0", datatype="UINT8", shape=[1, 20 * MiB])
    request.raw_input_contents.append(rng.bytes(20 * MiB))
    reply = ModelInferResponse(model_name="iris")
    reply.outputs.add(name="output-0", datatype="UINT8", shape=[1, 20 * MiB])
    reply.raw_output_contents.append(rng.bytes(20 * MiB))
    sent, answer = request.SerializeToString(), reply.SerializeToString()
    canned_grpc.unary[INFER] = answering(answer)

    assert await infer(relay, sent, timeout=10) == answer

    assert (await canned_grpc.call_to(INFER)).requests == [sent]
    await settled(relay, "ml_requests_total", 1, route=INFER_ROUTE, code="OK")


async def test_messages_over_the_limit_are_refused_and_the_relay_keeps_serving(
    start_relay: StartRelay, canned_grpc: CannedGrpc
) -> None:
    sidecar = await start_relay(grpc_max_message_bytes=1 * MiB)
    too_big = b"\x00" * (2 * MiB)

    async def answer_by_request(request: bytes, context: Context) -> bytes:
        return too_big if request == b"big reply, please" else IRIS

    canned_grpc.unary[INFER] = answer_by_request

    with pytest.raises(aio.AioRpcError) as refused_request:
        await infer(sidecar, too_big, timeout=5)
    with pytest.raises(aio.AioRpcError) as refused_reply:
        await infer(sidecar, b"big reply, please", timeout=5)

    assert refused_request.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused_reply.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The sidecar refused the large request itself: only the small one went upstream.
    assert [call.requests for call in canned_grpc.calls_to(INFER)] == [[b"big reply, please"]]
    assert await infer(sidecar, IRIS, timeout=5) == IRIS  # still serving
    text = await settled(sidecar, "ml_requests_total", 1, route=INFER_ROUTE, code="OK")
    # The reply refused. gRPC refuses a request over the limit before any handler runs, so
    # that call is in no metric.
    assert_sample(text, "ml_requests_total", 1, route=INFER_ROUTE, code="RESOURCE_EXHAUSTED")


# Metadata, trailers, status


async def test_metadata_both_ways_and_the_client_request_id_kept(
    relay: Sidecar, canned_grpc: CannedGrpc
) -> None:
    async def with_metadata(request: bytes, context: Context) -> bytes:
        await context.send_initial_metadata((("x-served-by", "canned"), ("x-tag-bin", b"\xff\x00")))
        context.set_trailing_metadata((("x-cost", "7"), ("x-digest-bin", b"\x01\x02\x03")))
        return IRIS

    canned_grpc.unary[INFER] = with_metadata
    sent = (("x-tenant", "acme"), ("x-trace-bin", b"\x00\x01\xfe\xff"), ("x-request-id", "req-42"))
    async with channel_to(relay) as channel:
        call = unary(channel, INFER)(IRIS, metadata=sent, timeout=5)
        assert await call == IRIS
        initial = metadata_of(await call.initial_metadata())
        trailing = metadata_of(await call.trailing_metadata())

    seen = await canned_grpc.call_to(INFER)
    for key, value in sent:
        assert seen.value(key) == value
    assert initial == (
        ("x-served-by", "canned"),
        ("x-tag-bin", b"\xff\x00"),
        ("x-request-id", "req-42"),
    )
    assert trailing == (("x-cost", "7"), ("x-digest-bin", b"\x01\x02\x03"))
    await settled(relay, "ml_requests_total", 1, model_name="iris", route=INFER_ROUTE, code="OK")


async def test_request_id_is_added_when_the_client_sent_none_and_returned(
    relay: Sidecar, canned_grpc: CannedGrpc
) -> None:
    async with channel_to(relay) as channel:
        call = unary(channel, INFER)(IRIS, timeout=5)
        await call
        initial = metadata_of(await call.initial_metadata())

    upstream_saw = (await canned_grpc.call_to(INFER)).value("x-request-id")
    assert isinstance(upstream_saw, str)
    assert upstream_saw
    assert value_of(initial, "x-request-id") == upstream_saw


async def test_upstream_error_status_details_and_trailers_reach_the_client_unchanged(
    relay: Sidecar, canned_grpc: CannedGrpc
) -> None:
    async def refuse(request: bytes, context: Context) -> bytes:
        await context.send_initial_metadata((("x-served-by", "canned"),))
        trailers = (("x-why", "shape"), ("x-detail-bin", b"\x08\x03"))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input", trailers)
        raise AssertionError("abort raises")

    canned_grpc.unary[INFER] = refuse

    with pytest.raises(aio.AioRpcError) as failed:
        await infer(relay, IRIS, metadata=(("x-request-id", "req-7"),), timeout=5)

    error = failed.value
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "bad input")
    assert metadata_of(error.initial_metadata()) == (
        ("x-served-by", "canned"),
        ("x-request-id", "req-7"),
    )
    assert metadata_of(error.trailing_metadata()) == (
        ("x-why", "shape"),
        ("x-detail-bin", b"\x08\x03"),
    )
    text = await settled(relay, "ml_errors_total", 1, route=INFER_ROUTE, error_type="client_4xx")
    assert_sample(text, "ml_requests_total", 1, route=INFER_ROUTE, code="INVALID_ARGUMENT")


# Messages as they are


def _varint(value: int) -> bytes:
    found = bytearray()
    while value >= 0x80:
        found.append(value & 0x7F | 0x80)
        value >>= 7
    found.append(value)
    return bytes(found)


def unknown_fields() -> bytes:
    """Fields 99 (a varint) and 100 (bytes), which no OIP message has: a newer schema's."""
    return _varint(99 << 3) + _varint(1) + _varint(100 << 3 | 2) + _varint(6) + b"future"


async def test_unknown_fields_reach_the_other_side_byte_for_byte(
    relay: Sidecar, canned_grpc: CannedGrpc
) -> None:
    sent = IRIS + unknown_fields()
    answer = iris_reply([2]).SerializeToString() + unknown_fields()
    # What a newer schema would write: both still parse, and extraction reads the reply.
    assert ModelInferRequest.FromString(sent).inputs[0].name == "input-0"
    assert ModelInferResponse.FromString(answer).outputs[0].name == "predict"

    canned_grpc.unary[INFER] = answering(answer)

    assert await infer(relay, sent, timeout=5) == answer

    assert (await canned_grpc.call_to(INFER)).requests == [sent]
    text = await settled(relay, "ml_predictions_total", 1, model_name="iris", **{"class": "2"})
    assert_sample(text, "ml_errors_total", None, route=INFER_ROUTE)


GARBAGE = b"\xff\xfe\xfd" * 20  # no protobuf message: its first key has wire type 7, which none has


@pytest.mark.parametrize(
    ("sent", "answer", "error_type"),
    [
        (GARBAGE, iris_reply().SerializeToString(), "request_parse"),
        (IRIS, GARBAGE, "response_parse"),
    ],
    ids=["request", "reply"],
)
async def test_messages_that_are_not_oip_are_relayed_exactly_and_counted_as_parse_errors(
    relay: Sidecar, canned_grpc: CannedGrpc, sent: bytes, answer: bytes, error_type: str
) -> None:
    with pytest.raises(DecodeError):
        ModelInferRequest.FromString(GARBAGE)
    canned_grpc.unary[INFER] = answering(answer)

    assert await infer(relay, sent, timeout=5) == answer
    assert (await canned_grpc.call_to(INFER)).requests == [sent]
    text = await settled(relay, "ml_errors_total", 1, route=INFER_ROUTE, error_type=error_type)
    assert_sample(text, "ml_requests_total", 1, route=INFER_ROUTE, code="OK")
    # Still serving, and still reading the calls it can.
    class_1 = iris_reply([1]).SerializeToString()
    canned_grpc.unary[INFER] = answering(class_1)
    assert await infer(relay, IRIS, timeout=5) == class_1
    await settled(relay, "ml_predictions_total", 1, model_name="iris", **{"class": "1"})


# Tensor contents of every kind

WIDTH = [1.5, float("nan"), float("inf")]
COUNT = [3, 99, -1]
FLAG = [True, False, True]
SPECIES = [b"a", b"b", b"c"]
PREDICTED = [b"setosa", b"virginica", b"setosa"]


def raw_strings(values: Iterable[bytes]) -> bytes:
    """A raw BYTES tensor: each element's length (uint32, little-endian), then its bytes."""
    return b"".join(len(value).to_bytes(4, "little") + value for value in values)


def typed_call() -> tuple[ModelInferRequest, ModelInferResponse]:
    """Three rows of four inputs and a class output, in typed `contents`."""
    request = ModelInferRequest(model_name="iris")
    request.inputs.add(name="width", datatype="FP32", shape=[3]).contents.fp32_contents[:] = WIDTH
    request.inputs.add(name="count", datatype="INT64", shape=[3]).contents.int64_contents[:] = COUNT
    request.inputs.add(name="flag", datatype="BOOL", shape=[3]).contents.bool_contents[:] = FLAG
    species = request.inputs.add(name="species", datatype="BYTES", shape=[3])
    species.contents.bytes_contents[:] = SPECIES
    reply = ModelInferResponse(model_name="iris")
    predict = reply.outputs.add(name="predict", datatype="BYTES", shape=[3])
    predict.contents.bytes_contents[:] = PREDICTED
    return request, reply


def raw_call() -> tuple[ModelInferRequest, ModelInferResponse]:
    """The same call in raw contents, with FP16 (which has no typed contents) for the width."""
    request = ModelInferRequest(model_name="iris")
    for name, datatype in (("width", "FP16"), ("count", "INT64"), ("flag", "BOOL")):
        request.inputs.add(name=name, datatype=datatype, shape=[3])
    request.inputs.add(name="species", datatype="BYTES", shape=[3])
    request.raw_input_contents[:] = [
        np.array(WIDTH, dtype="<f2").tobytes(),
        np.array(COUNT, dtype="<i8").tobytes(),
        np.array(FLAG, dtype="?").tobytes(),
        raw_strings(SPECIES),
    ]
    reply = ModelInferResponse(model_name="iris")
    reply.outputs.add(name="predict", datatype="BYTES", shape=[3])
    reply.raw_output_contents.append(raw_strings(PREDICTED))
    return request, reply


@pytest.mark.parametrize("build", [typed_call, raw_call], ids=["typed", "raw"])
async def test_contents_of_each_datatype_are_read_value_by_value(
    start_relay: StartRelay,
    canned_grpc: CannedGrpc,
    build: Callable[[], tuple[ModelInferRequest, ModelInferResponse]],
) -> None:
    # Rules under which the values of count and flag show in the data-quality counters.
    rules = {"count": FeatureRule(min=0, max=10), "flag": FeatureRule(max=0.5)}
    sidecar = await start_relay(features=rules)
    request, reply = build()
    answer = reply.SerializeToString()
    canned_grpc.unary[INFER] = answering(answer)

    assert await infer(sidecar, request.SerializeToString(), timeout=5) == answer

    iris = {"model_name": "iris"}
    text = await settled(sidecar, "ml_predictions_total", 2, **iris, **{"class": "setosa"})
    assert_sample(text, "ml_predictions_total", 1, **iris, **{"class": "virginica"})
    invalid = "ml_feature_invalid_total"
    assert_sample(text, invalid, 1, **iris, feature="width", reason="nan")
    assert_sample(text, invalid, 1, **iris, feature="width", reason="inf")
    assert_sample(text, invalid, 2, **iris, feature="count", reason="out_of_range")  # 99, -1
    # BOOL values are booleans, as JSON's true and false: not numbers, so never in range.
    assert_sample(text, invalid, 3, **iris, feature="flag", reason="wrong_type")
    assert_sample(text, invalid, None, **iris, feature="flag", reason="out_of_range")
    assert_sample(text, invalid, 3, **iris, feature="species", reason="wrong_type")
    assert_sample(text, "ml_errors_total", None, route=INFER_ROUTE)
