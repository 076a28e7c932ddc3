"""The gRPC listener: every method relayed to the upstream's gRPC port as bytes, and the Open
Inference Protocol's inference calls handed to the observer like HTTP exchanges.

Messages are never decoded or re-encoded here: grpcio hands over each serialized message as
bytes and takes bytes back. Metadata goes both ways (less what gRPC itself owns), and so do the
status code, its details and the trailing metadata. A client's deadline bounds the upstream call
(else `upstream_timeout` does), and a cancellation on either side cancels the other.

Imported only when `grpc_port` is set: grpcio costs the process about 10 MB.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic

import grpc
from grpc import aio

from sidecar.exchange import CallObserver, Exchange, TicketT
from sidecar.oip import INFER, METHODS, REQUEST_TYPE, RESPONSE_TYPE, STREAM_INFER, UNARY_METHODS
from sidecar.oip.oip_pb2 import ModelStreamInferResponse
from sidecar.proxy.headers import new_request_id, trace_id

__all__ = ["GrpcRelay"]

log = logging.getLogger(__name__)

REQUEST_ID: Final = "x-request-id"
# Metadata the gRPC stacks set themselves: what a client sent of these does not go on.
_OWNED: Final = frozenset({"user-agent", "content-type", "te", "grace-timeout"})
# gRPC status -> the HTTP status of the same meaning (google.rpc.Code's mapping), which decides
# what `ml_errors_total` counts, as for HTTP; `code` carries the gRPC name itself.
_HTTP_STATUS: Final = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500,
}  # fmt: skip
# Failures the proxy names itself, as it does for HTTP (docs/metrics.md, error_type).
_PROXY_ERRORS: Final = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "upstream_timeout",
    grpc.StatusCode.UNAVAILABLE: "upstream_unreachable",
}

# Seconds before the client's deadline within which its cancel counts as the deadline passing.
_DEADLINE_SLACK: Final = 0.01

Entries = tuple[tuple[str, str | bytes], ...]  # metadata as grpcio takes it


@dataclass(frozen=True, slots=True)
class _Call:
    """What is known of one relayed call before it is sent."""

    path: str
    request_id: str
    metadata: Entries  # what goes to the upstream
    headers: Mapping[str, str]  # the text metadata, as the exchange's request headers
    started: float
    trace_id: str | None  # from the client's traceparent metadata, as for HTTP


class GrpcRelay(Generic[TicketT]):
    """The gRPC server and its channel to the upstream. `await start(host, port)`, then
    `address` says where it listens; `await stop(grace)` lets calls in flight finish."""

    def __init__(
        self,
        upstream: str,
        observer: CallObserver[TicketT],
        *,
        max_message_bytes: int,
        upstream_timeout: float,
        max_body_bytes: int,
    ) -> None:
        sizes = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._channel = aio.insecure_channel(upstream, options=sizes)
        self.observer = observer
        self._timeout = upstream_timeout
        self.max_body = max_body_bytes
        self._sizes = sizes
        self._server: aio.Server | None = None
        self._unary: dict[str, aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}
        self._streams: dict[str, aio.StreamStreamMultiCallable[bytes, bytes]] = {}
        self.address = ""

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Listen on host:port. gRPC shares a port it binds by default (SO_REUSEPORT), which
        would let a second sidecar start on a taken port unnoticed: only the workers of
        --workers, which do share the port, get it."""
        options = [*self._sizes, ("grpc.so_reuseport", int(reuse_port))]
        server = self._server = aio.server(options=options)
        server.add_generic_rpc_handlers((_EveryMethod(self),))
        try:
            bound = server.add_insecure_port(f"{_bracketed(host)}:{port}")
        except RuntimeError:  # grpcio raises this, not OSError, for a port it cannot bind
            bound = 0
        if bound == 0:
            msg = f"cannot listen for gRPC on {host}:{port} (grpc_port): is it taken?"
            raise OSError(msg)
        await server.start()
        self.address = f"{_bracketed(host)}:{bound}"

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        await self._channel.close()

    def handler(self, path: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        # partial, not lambda: grpcio awaits a handler that inspect calls a coroutine function
        # (or iterates an async generator function), and inspect sees through a partial.
        if path in UNARY_METHODS:
            return grpc.unary_unary_rpc_method_handler(functools.partial(self._relay_unary, path))
        return grpc.stream_stream_rpc_method_handler(functools.partial(self._relay_stream, path))

    async def _relay_unary(
        self, path: str, request: bytes, context: aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        call_info = _begin(path, context)
        ticket = self.observer.begin_call(path, *_model_of(request, path))
        relay = self._unary.get(path)
        if relay is None:
            relay = self._unary[path] = self._channel.unary_unary(path)
        call = relay(request, timeout=self._deadline(context), metadata=call_info.metadata)
        try:
            response = await call
        except aio.AioRpcError as error:
            self.observe(ticket, exchange(call_info, error.code(), len(request), 0))
            await _relay_failure(context, error, call_info.request_id)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            call.cancel()
            self.observe(ticket, exchange(call_info, _cut_short(context), len(request), 0))
            raise
        upstream_done = time.perf_counter()
        initial = await call.initial_metadata()
        await context.send_initial_metadata(_with_id(initial, call_info.request_id))
        context.set_trailing_metadata(tuple(await call.trailing_metadata() or ()))
        captured = path == INFER and max(len(request), len(response)) <= self.max_body
        record = exchange(
            call_info, grpc.StatusCode.OK, len(request), len(response), upstream_done,
            (request, response) if captured else None,
        )  # fmt: skip
        self.observe(ticket, record)
        return response

    async def _relay_stream(
        self,
        path: str,
        requests: AsyncIterator[bytes],
        context: aio.ServicerContext[bytes, bytes],
    ) -> AsyncIterator[bytes]:
        call_info = _begin(path, context)
        relay = self._streams.get(path)
        if relay is None:
            relay = self._channel.stream_stream(path)
            if path in METHODS:  # a client names any path it likes: only known ones are kept
                self._streams[path] = relay
        stream = _StreamRecord(self, call_info)
        call = relay(
            stream.forward(requests), timeout=self._deadline(context), metadata=call_info.metadata
        )
        initial_sent = False
        code: grpc.StatusCode | None = None  # None: the client cancelled
        try:
            async for response in call:
                if not initial_sent:
                    initial = await call.initial_metadata()
                    await context.send_initial_metadata(_with_id(initial, call_info.request_id))
                    initial_sent = True
                stream.answered(response)
                yield response
            if not initial_sent:
                initial = await call.initial_metadata()
                await context.send_initial_metadata(_with_id(initial, call_info.request_id))
            context.set_trailing_metadata(tuple(await call.trailing_metadata() or ()))
            code = grpc.StatusCode.OK
        except aio.AioRpcError as error:
            code = error.code()
            await _relay_failure(context, error, call_info.request_id, initial_sent=initial_sent)
        finally:
            if code is None:
                call.cancel()
                code = _cut_short(context)
            stream.finish(code)

    def _deadline(self, context: aio.ServicerContext[bytes, bytes]) -> float:
        remaining = context.time_remaining()
        return self._timeout if remaining is None else min(remaining, self._timeout)

    def observe(self, ticket: TicketT, record: Exchange) -> None:
        self.observer.end(ticket, record)


class _EveryMethod(grpc.GenericRpcHandler):
    def __init__(self, relay: GrpcRelay[Any]) -> None:
        self._relay = relay

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes]:
        return self._relay.handler(handler_call_details.method)


class _StreamRecord(Generic[TicketT]):
    """What a streaming call hands the observer. A ModelStreamInfer call is many inferences:
    each request message is begun as one, and ended by the reply paired with it (the oldest
    unanswered request: right for every model that answers in order, which all but Triton's
    decoupled models do), or by the end of the call. Any other stream is one exchange."""

    def __init__(self, relay: GrpcRelay[TicketT], call: _Call) -> None:
        self._relay = relay
        self._call = call
        self._per_message = call.path == STREAM_INFER
        self._waiting: deque[tuple[TicketT, bytes | None, float]] = deque()
        self._ticket = (
            None if self._per_message else relay.observer.begin_call(call.path, None, None)
        )
        self.request_bytes = 0
        self.response_bytes = 0

    async def forward(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for request in requests:
            self.request_bytes += len(request)
            if self._per_message:
                ticket = self._relay.observer.begin_call(
                    self._call.path, *_model_of(request, INFER)
                )
                kept = request if len(request) <= self._relay.max_body else None
                self._waiting.append((ticket, kept, time.perf_counter()))
            yield request

    def answered(self, response: bytes) -> None:
        self.response_bytes += len(response)
        if not self._waiting:
            return
        ticket, request, sent = self._waiting.popleft()
        reply = _stream_reply(response)
        call = dataclasses.replace(self._call, started=sent)
        if reply is None:  # the model's error, in the stream: a failed inference
            record = exchange(call, grpc.StatusCode.INTERNAL, len(request or b""), len(response))
        else:
            captured = request is not None and len(reply) <= self._relay.max_body
            record = exchange(
                call, grpc.StatusCode.OK, len(request or b""), len(response),
                bodies=(request, reply) if captured and request is not None else None,
            )  # fmt: skip
        self._relay.observe(ticket, record)

    def finish(self, code: grpc.StatusCode | None) -> None:
        """The call has ended with `code` (None: the client cancelled it)."""
        if self._ticket is not None:
            record = exchange(self._call, code, self.request_bytes, self.response_bytes)
            self._relay.observe(self._ticket, record)
        while self._waiting:  # requests the call ended before a reply
            ticket, request, sent = self._waiting.popleft()
            call = dataclasses.replace(self._call, started=sent)
            self._relay.observe(ticket, exchange(call, code, len(request or b""), 0))


def exchange(
    call: _Call,
    code: grpc.StatusCode | None,
    request_size: int,
    response_size: int,
    upstream_done: float | None = None,
    bodies: tuple[bytes, bytes] | None = None,
) -> Exchange:
    """The exchange record of a call (code None: the client cancelled it)."""
    now = time.perf_counter()
    error: str | None
    if code is None:
        status, error, name = 499, "client_disconnect", grpc.StatusCode.CANCELLED.name
    else:
        status, error, name = _HTTP_STATUS[code], _PROXY_ERRORS.get(code), code.name
    answered = code is not None and code not in _PROXY_ERRORS
    return Exchange(
        method="POST",
        path=call.path,
        status=status,
        grpc_status=name,
        request_id=call.request_id,
        request_headers={**call.headers, "content-type": REQUEST_TYPE},
        response_headers={"content-type": RESPONSE_TYPE},
        request_body=bodies[0] if bodies else None,
        response_body=bodies[1] if bodies else None,
        request_size=request_size,
        response_size=response_size,
        # As for HTTP: upstream time only for calls the upstream answered.
        upstream_seconds=((upstream_done or now) - call.started) if answered else 0.0,
        total_seconds=now - call.started,
        error=error,
        trace_id=call.trace_id,
    )


def _cut_short(context: aio.ServicerContext[bytes, bytes]) -> grpc.StatusCode | None:
    """Why grpc.aio cancelled a handler: DEADLINE_EXCEEDED once the client's deadline has passed
    (the upstream did not answer in time, as upstream_timeout counts for HTTP), else None (the
    client cancelled). The server's own timer and the client's cancel at its deadline race, so a
    cancel within _DEADLINE_SLACK of the deadline counts as the deadline."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= _DEADLINE_SLACK:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return None


def _begin(path: str, context: aio.ServicerContext[bytes, bytes]) -> _Call:
    metadata, headers, request_id = _forwarded(context.invocation_metadata() or ())
    traceparent = headers.get("traceparent")
    traced = trace_id(traceparent.encode("latin-1")) if traceparent else None
    return _Call(path, request_id, metadata, headers, time.perf_counter(), traced)


def _stream_reply(response: bytes) -> bytes | None:
    """The ModelInferResponse inside a ModelStreamInferResponse, for extraction (the client got
    the original bytes); None when the message has an error_message or no reply."""
    try:
        message = ModelStreamInferResponse.FromString(response)
    except Exception:  # not ours to judge: extraction sees no pair
        return None
    if message.error_message or not message.HasField("infer_response"):
        return None
    return message.infer_response.SerializeToString()


async def _relay_failure(
    context: aio.ServicerContext[bytes, bytes],
    error: aio.AioRpcError,
    request_id: str,
    *,
    initial_sent: bool = False,
) -> None:
    """End the client's call with the upstream's status, details and metadata (raises)."""
    if not initial_sent:
        await context.send_initial_metadata(_with_id(error.initial_metadata(), request_id))
    await context.abort(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()))


def _forwarded(metadata: Iterable[Any]) -> tuple[Entries, Mapping[str, str], str]:
    """The client's metadata to send on, its text entries, and the request id: the client's
    x-request-id, else a new one, added to what is sent."""
    kept: list[tuple[str, str | bytes]] = []
    text: dict[str, str] = {}
    for key, value in metadata:
        if key.startswith(("grpc-", ":")) or key in _OWNED:
            continue
        kept.append((key, value))
        if isinstance(value, str):
            text[key] = value
    request_id = text.get(REQUEST_ID)
    if request_id is None:
        request_id = new_request_id()
        kept.append((REQUEST_ID, request_id))
        text[REQUEST_ID] = request_id
    return tuple(kept), text, request_id


def _with_id(metadata: Iterable[Any] | None, request_id: str) -> Entries:
    """The upstream's initial metadata, with the request id unless it sent one itself."""
    found = tuple((key, value) for key, value in metadata or ())
    if any(key == REQUEST_ID for key, _ in found):
        return found
    return (*found, (REQUEST_ID, request_id))


def _model_of(request: bytes, path: str) -> tuple[str | None, str | None]:
    """model_name and model_version of a ModelInferRequest, read from the first bytes: every
    protobuf serializer writes fields in number order, and these are fields 1 and 2. None for
    what is not there, or not such a request (the observer then uses the configured model)."""
    if path != INFER:
        return None, None
    name, position = _string_field(request, 0, 0x0A)
    version, _ = _string_field(request, position, 0x12)
    return name or None, version or None


def _string_field(message: bytes, position: int, tag: int) -> tuple[str | None, int]:
    """The string field with this tag byte at `position`, and where the next field starts."""
    if position >= len(message) or message[position] != tag:
        return None, position
    length, shift, cursor = 0, 0, position + 1
    while cursor < len(message) and shift < 35:  # a varint of at most 5 bytes
        byte = message[cursor]
        length |= (byte & 0x7F) << shift
        cursor += 1
        if byte < 0x80:
            end = cursor + length
            if end > len(message):
                return None, position
            return message[cursor:end].decode("utf-8", "replace"), end
        shift += 7
    return None, position


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
