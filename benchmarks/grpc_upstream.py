"""The canned gRPC model for benchmarks/grpc.sh: answers every ModelInfer with one fixed
ModelInferResponse (the iris model's `predict` and `predict_proba` for one row, as MLServer
gives them), and says ready to the sidecar's readiness probe. Nothing is decoded: it costs the
least a Python gRPC server can, so that the hop in front of it is what the benchmark measures.

With --relay-to HOST:PORT it is instead the floor the sidecar is measured against: a naive
grpc.aio relay of ModelInfer, as a user would write one by hand (metadata on, reply back, no
metrics), like naive_proxy.py for HTTP.

usage: grpc_upstream.py PORT [--relay-to HOST:PORT]
"""

from __future__ import annotations

import argparse

import grpc
import uvloop
from grpc import aio

from sidecar.oip.oip_pb2 import ModelInferResponse, ModelReadyResponse, ServerReadyResponse

SERVICE = "inference.GRPCInferenceService"
Context = aio.ServicerContext[bytes, bytes]


def iris_reply() -> bytes:
    reply = ModelInferResponse(model_name="iris", model_version="v1", id="bench")
    predict = reply.outputs.add(name="predict", datatype="INT64", shape=[1, 1])
    predict.contents.int64_contents.append(1)
    proba = reply.outputs.add(name="predict_proba", datatype="FP64", shape=[1, 3])
    proba.contents.fp64_contents.extend([0.02, 0.91, 0.07])
    return reply.SerializeToString()


def answering(reply: bytes) -> grpc.RpcMethodHandler[bytes, bytes]:
    async def answer(request: bytes, context: Context) -> bytes:
        return reply

    return grpc.unary_unary_rpc_method_handler(answer)


def canned_model() -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
    return {
        "ModelInfer": answering(iris_reply()),
        "ServerReady": answering(ServerReadyResponse(ready=True).SerializeToString()),
        "ModelReady": answering(ModelReadyResponse(ready=True).SerializeToString()),
    }


def naive_relay(upstream: str) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
    channel = aio.insecure_channel(upstream)
    infer: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/ModelInfer")

    async def relay(request: bytes, context: Context) -> bytes:
        metadata = tuple(context.invocation_metadata() or ())
        return await infer(request, metadata=metadata, timeout=context.time_remaining())

    return {"ModelInfer": grpc.unary_unary_rpc_method_handler(relay)}


async def serve(port: int, relay_to: str | None) -> None:
    methods = canned_model() if relay_to is None else naive_relay(relay_to)
    server = aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--relay-to", help="host:port: be a naive relay to it instead")
    options = parser.parse_args()
    uvloop.run(serve(options.port, options.relay_to))
