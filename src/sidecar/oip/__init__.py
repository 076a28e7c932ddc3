"""The Open Inference Protocol's gRPC messages (oip.proto, and the code protoc made of it), and
the names by which the gRPC relay hands them to extraction.

A leaf: the relay (sidecar.proxy.grpc_relay) and extraction (sidecar.extract.oip_grpc) both
read from here, and neither from the other.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "INFER",
    "METHODS",
    "REQUEST_TYPE",
    "RESPONSE_TYPE",
    "SERVICE",
    "STREAM_INFER",
    "UNARY_METHODS",
    "route_name",
]

SERVICE: Final = "inference.GRPCInferenceService"
INFER: Final = f"/{SERVICE}/ModelInfer"
STREAM_INFER: Final = f"/{SERVICE}/ModelStreamInfer"  # Triton's, and MLServer's since 1.4

# The content types under which the relay hands ModelInfer messages to extraction (as the
# Content-Type of the exchange's bodies): a gRPC message names no type of its own on the wire.
REQUEST_TYPE: Final = "application/grpc+proto; message=inference.ModelInferRequest"
RESPONSE_TYPE: Final = "application/grpc+proto; message=inference.ModelInferResponse"

# The service's methods that take and give one message (KServe's and Triton's). Any other
# method is relayed as a stream, which gRPC allows for every method on the wire.
UNARY_METHODS: Final = frozenset(
    f"/{SERVICE}/{name}"
    for name in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex",
        "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings",
    )
)  # fmt: skip
METHODS: Final = UNARY_METHODS | {STREAM_INFER}


def route_name(path: str) -> str:
    """The `route` label of a gRPC method: its full name, without the leading slash."""
    return path.removeprefix("/")
