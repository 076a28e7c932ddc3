"""A real MLServer's gRPC port behind the sidecar, driven by tritonclient (a client no one here
wrote): replies relayed exactly, classes counted exactly, over raw and typed tensor contents.

MLServer is the session's (conftest.py `mlserver`); the HTTP twin of each check is in
tests/test_mlserver_integration.py.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc

from sidecar.app import Sidecar
from sidecar.demo.mlserver import MLServer, iris_rows
from tests.conftest import StartSidecar, scrape_until
from tests.test_mlserver_integration import total

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "iris"
BATCHES = (1, 1, 2, 5, 1, 8, 3, 13, 1, 4)


@pytest.fixture
async def sidecar(mlserver: MLServer, start_sidecar: StartSidecar) -> Sidecar:
    return await start_sidecar(
        mlserver.url,
        preset="open-inference-v2",
        grpc_port=0,
        grpc_upstream=mlserver.grpc_address,
    )


def features(seed: int, rows: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.array(iris_rows(random.Random(seed), rows), dtype=np.float64)


def triton_infer(address: str, batch: np.ndarray[Any, Any], request_id: str) -> Any:
    """One ModelInfer through tritonclient's own client (raw_input_contents), as a message."""
    client = triton_grpc.InferenceServerClient(address)
    try:
        tensor = triton_grpc.InferInput("input-0", list(batch.shape), "FP64")
        tensor.set_data_from_numpy(batch)
        result = client.infer(MODEL, [tensor], request_id=request_id)
        return result.get_response()
    finally:
        client.close()


def typed_request(batch: np.ndarray[Any, Any], request_id: str) -> service_pb2.ModelInferRequest:
    """The same call with typed `contents` instead of raw bytes."""
    request = service_pb2.ModelInferRequest(model_name=MODEL, id=request_id)
    tensor = request.inputs.add(name="input-0", datatype="FP64", shape=list(batch.shape))
    tensor.contents.fp64_contents.extend(batch.ravel().tolist())
    return request


def stub_infer(address: str, request: service_pb2.ModelInferRequest) -> Any:
    with grpc.insecure_channel(address) as channel:
        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)


def classes_of(responses: list[Any]) -> Counter[str]:
    """Rows per class in MLServer's `predict` output, raw or typed as MLServer sent it."""
    counts: Counter[str] = Counter()
    for response in responses:
        if response.raw_output_contents:
            labels = triton_grpc.InferResult(response).as_numpy("predict").ravel().tolist()
        else:
            (predict,) = (out for out in response.outputs if out.name == "predict")
            contents = predict.contents
            labels = list(
                contents.int64_contents or contents.int_contents or contents.fp64_contents
            )
        counts.update(str(int(label)) for label in labels)
    return counts


def requests(seed: int) -> Iterator[tuple[np.ndarray[Any, Any], str]]:
    for position, rows in enumerate(BATCHES):
        yield features(seed + position, rows), f"grpc-{seed}-{position}"


async def test_raw_contents_replies_equal_direct_and_classes_are_counted_exactly(
    sidecar: Sidecar, mlserver: MLServer
) -> None:
    direct, proxied = [], []
    for batch, request_id in requests(seed=1):
        direct.append(
            await asyncio.to_thread(triton_infer, mlserver.grpc_address, batch, request_id)
        )
        proxied.append(
            await asyncio.to_thread(triton_infer, sidecar.grpc_address, batch, request_id)
        )
    assert [r.SerializeToString() for r in proxied] == [r.SerializeToString() for r in direct]
    await assert_counted(sidecar, classes_of(proxied), calls=len(BATCHES))


async def test_typed_contents_replies_equal_direct_and_classes_are_counted_exactly(
    sidecar: Sidecar, mlserver: MLServer
) -> None:
    direct, proxied = [], []
    for batch, request_id in requests(seed=100):
        request = typed_request(batch, request_id)
        direct.append(await asyncio.to_thread(stub_infer, mlserver.grpc_address, request))
        proxied.append(await asyncio.to_thread(stub_infer, sidecar.grpc_address, request))
    assert [r.SerializeToString() for r in proxied] == [r.SerializeToString() for r in direct]
    await assert_counted(sidecar, classes_of(proxied), calls=len(BATCHES))


async def assert_counted(sidecar: Sidecar, expected: Counter[str], *, calls: int) -> None:
    assert sum(expected.values()) == sum(BATCHES)
    route = "inference.GRPCInferenceService/ModelInfer"

    def counted(text: str) -> dict[str, float]:
        return {
            label: total(text, "ml_predictions_total", model_name=MODEL, **{"class": label})
            for label in expected
        }

    text = await scrape_until(sidecar, lambda text: counted(text) == expected)
    assert counted(text) == expected
    assert total(text, "ml_predictions_total") == sum(expected.values())
    assert total(text, "ml_requests_total", model_name=MODEL, route=route, code="OK") == calls
    assert total(text, "ml_errors_total") == 0


async def test_http_path_with_tritonclient_counts_the_same_model(
    sidecar: Sidecar, mlserver: MLServer
) -> None:
    """tritonclient[http] through the proxy port: the same model, the same counts."""
    batch = features(7, 6)

    def infer(url: str) -> Any:
        client = triton_http.InferenceServerClient(url.removeprefix("http://"))
        try:
            tensor = triton_http.InferInput("input-0", list(batch.shape), "FP64")
            tensor.set_data_from_numpy(batch, binary_data=False)
            return client.infer(MODEL, [tensor]).as_numpy("predict")
        finally:
            client.close()

    direct = await asyncio.to_thread(infer, mlserver.url)
    proxied = await asyncio.to_thread(infer, sidecar.proxy_url)
    assert proxied.tolist() == direct.tolist()
    expected = Counter(str(int(label)) for label in proxied.ravel())
    text = await scrape_until(
        sidecar, lambda text: total(text, "ml_predictions_total", model_name=MODEL) == 6
    )
    for label, rows in expected.items():
        assert total(text, "ml_predictions_total", model_name=MODEL, **{"class": label}) == rows
