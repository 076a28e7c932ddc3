"""A canned gRPC upstream for the relay's tests: a real grpc.aio server on an ephemeral port,
in the test's own event loop, that answers every method by a script and records each call it
saw (its metadata, every message as bytes, and whether it ended cancelled).

Messages are bytes both ways, as the relay sees them: a test builds them with the OIP message
classes and compares what arrives byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc
from grpc import aio

from sidecar.oip import INFER, STREAM_INFER
from sidecar.oip.oip_pb2 import ModelInferResponse, ModelStreamInferResponse

__all__ = [
    "BIGGEST_MESSAGE",
    "CannedGrpc",
    "Context",
    "SeenCall",
    "StreamScript",
    "UnaryScript",
    "canned_grpc_server",
    "iris_reply",
]

Context = aio.ServicerContext[bytes, bytes]
UnaryScript = Callable[[bytes, Context], Awaitable[bytes]]
StreamScript = Callable[[AsyncIterator[bytes], Context], AsyncIterator[bytes]]

# The canned server takes and gives messages this large (gRPC's own default is 4 MiB): the
# size tests measure the sidecar's limit, not this server's.
BIGGEST_MESSAGE = 128 * 1024 * 1024
SETTLE_TIMEOUT = 5.0  # seconds a test waits for the canned server to see something


@dataclass
class SeenCall:
    """One call as the canned server saw it."""

    path: str
    metadata: tuple[tuple[str, str | bytes], ...]
    requests: list[bytes] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a first message is here
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    # How it ended, once `ended` is set. grpc.aio says a call ended early (the client cancelled,
    # its deadline passed) by cancelling the handler's task; context.cancelled() stays False.
    cancelled: bool = False

    def value(self, key: str) -> str | bytes | None:
        """The metadata value under `key` (the last one, if it came more than once)."""
        found = [value for name, value in self.metadata if name == key]
        return found[-1] if found else None

    async def ended_cancelled(self) -> bool:
        """Whether the call ended cancelled, once it has ended (bounded: fails, not hangs)."""
        await asyncio.wait_for(self.ended.wait(), SETTLE_TIMEOUT)
        return self.cancelled


def iris_reply(classes: Iterable[int] = (0,)) -> ModelInferResponse:
    """A ModelInferResponse as MLServer gives for the iris model: `predict` (INT64 classes) and
    `predict_proba` (FP64, one row of three per class)."""
    labels = list(classes)
    reply = ModelInferResponse(model_name="iris", model_version="v1", id="canned")
    predict = reply.outputs.add(name="predict", datatype="INT64", shape=[len(labels), 1])
    predict.contents.int64_contents.extend(labels)
    proba = reply.outputs.add(name="predict_proba", datatype="FP64", shape=[len(labels), 3])
    for label in labels:
        proba.contents.fp64_contents.extend([0.9 if j == label else 0.05 for j in range(3)])
    return reply


async def _answer_iris(request: bytes, context: Context) -> bytes:
    return iris_reply().SerializeToString()


async def _answer_each_iris(
    requests: AsyncIterator[bytes], context: Context
) -> AsyncIterator[bytes]:
    """ModelStreamInfer: one reply per request, in order (class 0, 1, 2, 0, ...)."""
    position = 0
    async for _ in requests:
        reply = ModelStreamInferResponse(infer_response=iris_reply([position % 3]))
        position += 1
        yield reply.SerializeToString()


class CannedGrpc:
    """The canned server. `unary[path]` and `streams[path]` say how each method answers (a
    test may set its own before calling); a path in neither is UNIMPLEMENTED. `calls` lists
    what arrived, oldest first."""

    def __init__(self) -> None:
        self.unary: dict[str, UnaryScript] = {INFER: _answer_iris}
        self.streams: dict[str, StreamScript] = {STREAM_INFER: _answer_each_iris}
        self.calls: list[SeenCall] = []
        self.address = ""
        self._new_call = asyncio.Condition()
        sizes = [
            ("grpc.max_receive_message_length", BIGGEST_MESSAGE),
            ("grpc.max_send_message_length", BIGGEST_MESSAGE),
        ]
        self._server = aio.server(options=sizes)
        self._server.add_generic_rpc_handlers((_Scripted(self),))

    async def start(self) -> None:
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        await self._server.stop(grace=None)

    def calls_to(self, path: str) -> list[SeenCall]:
        return [call for call in self.calls if call.path == path]

    async def call_to(self, path: str) -> SeenCall:
        """The first call to `path`, once one has arrived (bounded: fails, not hangs)."""
        async with asyncio.timeout(SETTLE_TIMEOUT), self._new_call:
            await self._new_call.wait_for(lambda: bool(self.calls_to(path)))
        return self.calls_to(path)[0]

    async def seen(self, path: str, context: Context, request: bytes | None = None) -> SeenCall:
        """Record a call that arrived (with its one request, for a unary call)."""
        metadata = tuple((key, value) for key, value in context.invocation_metadata() or ())
        call = SeenCall(path, metadata)
        if request is not None:
            call.requests.append(request)
            call.arrived.set()
        self.calls.append(call)
        async with self._new_call:
            self._new_call.notify_all()
        return call


class _Scripted(grpc.GenericRpcHandler):
    def __init__(self, canned: CannedGrpc) -> None:
        self._canned = canned

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        path = handler_call_details.method
        unary = self._canned.unary.get(path)
        if unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary_runner(path, unary))
        stream = self._canned.streams.get(path)
        if stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._stream_runner(path, stream))
        return None

    def _unary_runner(self, path: str, script: UnaryScript) -> UnaryScript:
        async def run(request: bytes, context: Context) -> bytes:
            call = await self._canned.seen(path, context, request)
            with _watched(call):
                return await script(request, context)

        return run

    def _stream_runner(self, path: str, script: StreamScript) -> StreamScript:
        async def run(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
            call = await self._canned.seen(path, context)

            async def recorded() -> AsyncIterator[bytes]:
                async for request in requests:
                    call.requests.append(request)
                    call.arrived.set()
                    yield request

            with _watched(call):
                async for reply in script(recorded(), context):
                    yield reply

        return run


@contextlib.contextmanager
def _watched(call: SeenCall) -> Iterator[None]:
    """Note how the handler's work ended: cancelled, or not."""
    try:
        yield
    except asyncio.CancelledError:
        call.cancelled = True
        raise
    finally:
        call.ended.set()


@contextlib.asynccontextmanager
async def canned_grpc_server() -> AsyncIterator[CannedGrpc]:
    """The canned server, started, and stopped at the end of the block."""
    canned = CannedGrpc()
    await canned.start()
    try:
        yield canned
    finally:
        await canned.stop()
