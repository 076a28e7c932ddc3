"""A real MLServer (scikit-learn iris) behind the sidecar: relayed untouched, counted exactly.

The MLServer venv comes from scripts/install-mlserver (the same recipe as scripts/demo), so the
first run installs it (about a minute) and later runs reuse it. MLServer runs once per session
(the `mlserver` fixture in conftest.py, shared with tests/test_grpc_mlserver.py).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Sidecar
from sidecar.demo.mlserver import MLServer, iris_rows, send_v2_traffic, v2_body
from tests.conftest import StartSidecar, scrape

pytestmark = [
    pytest.mark.slow,
    # The first test also pays for the session fixtures: installing MLServer and starting it.
    # A safety net against a hang, not a performance bound.
    pytest.mark.timeout(900),
]

JSON = {"Content-Type": "application/json"}
# Varied batch sizes, used in turn: single rows, small batches and a few large ones.
BATCH_SIZES = (1, 2, 3, 5, 8, 1, 13, 4, 21, 2)
TRAFFIC = 50
# Headers two calls to the same server may legitimately differ in.
VOLATILE = {"date", "x-request-id"}


@pytest.fixture
async def sidecar(mlserver: MLServer, start_sidecar: StartSidecar) -> Sidecar:
    return await start_sidecar(mlserver.url, preset="open-inference-v2")


def total(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels` (0 when there is none)."""
    return sum(
        metric.value
        for family in text_string_to_metric_families(text)
        for metric in family.samples
        if metric.name == name and all(metric.labels.get(k) == v for k, v in labels.items())
    )


async def scrape_until_steady(sidecar: Sidecar, done: Callable[[str], bool]) -> str:
    """Scrape until `done(text)` holds, or the text has not changed for 2 s (recording runs off
    the request path, on a queue), or 30 s have passed; return the last scrape."""
    text, unchanged = await scrape(sidecar), 0
    for _ in range(300):
        if done(text) or unchanged >= 20:
            break
        await asyncio.sleep(0.1)
        latest = await scrape(sidecar)
        unchanged = unchanged + 1 if latest == text else 0
        text = latest
    return text


async def fetch(
    client: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, list[tuple[str, str]], bytes]:
    async with client.post(url, data=body, headers=headers) as response:
        kept = [
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in response.raw_headers
        ]
        kept = [(name, value) for name, value in kept if name not in VOLATILE]
        return response.status, kept, await response.read()


def predicted_classes(responses: list[dict[str, Any]]) -> Counter[str]:
    """Rows per class, as the server returned them in its `predict` output."""
    counts: Counter[str] = Counter()
    for response in responses:
        (predict,) = (out for out in response["outputs"] if out["name"] == "predict")
        counts.update(str(label) for label in predict["data"])
    return counts


async def test_predictions_total_counts_exactly_the_classes_mlserver_returned(
    sidecar: Sidecar,
) -> None:
    """ml_predictions_total per class equals the classes in MLServer's answers, row for row."""
    responses = await send_v2_traffic(sidecar.proxy_url, TRAFFIC, BATCH_SIZES, seed=7)
    expected = predicted_classes(responses)
    assert sum(expected.values()) == sum(BATCH_SIZES) * TRAFFIC // len(BATCH_SIZES)
    assert set(expected) == {"0", "1", "2"}  # the traffic reaches every class

    def counted(text: str) -> dict[str, float]:
        return {
            label: total(text, "ml_predictions_total", model_name="iris", **{"class": label})
            for label in expected
        }

    text = await scrape_until_steady(
        sidecar,
        lambda text: (
            counted(text) == expected and total(text, "ml_requests_total", code="200") >= TRAFFIC
        ),
    )
    assert counted(text) == expected
    assert total(text, "ml_predictions_total") == sum(expected.values())
    assert total(text, "ml_requests_total", model_name="iris", code="200") == TRAFFIC
    assert total(text, "ml_requests_total") == TRAFFIC


async def test_versioned_path_is_counted_for_the_same_model(sidecar: Sidecar) -> None:
    """/v2/models/iris/versions/v1/infer is routed too, counted as model iris, version v1."""
    responses = await send_v2_traffic(sidecar.proxy_url, 5, 3, seed=11, version="v1")
    expected = predicted_classes(responses)

    def counted(text: str) -> float:
        return total(text, "ml_predictions_total", model_name="iris")

    text = await scrape_until_steady(sidecar, lambda text: counted(text) == 15)
    assert counted(text) == sum(expected.values()) == 15
    for label, rows in expected.items():
        labels = {"model_name": "iris", "model_version": "v1", "class": label}
        assert total(text, "ml_predictions_total", **labels) == rows
    assert total(text, "ml_requests_total", model_name="iris", model_version="v1", code="200") == 5


@pytest.mark.parametrize("rows", [1, 3, 40])
async def test_responses_through_the_proxy_are_byte_identical_to_direct_ones(
    sidecar: Sidecar, mlserver: MLServer, client: aiohttp.ClientSession, rows: int
) -> None:
    """Status, headers (bar date and the X-Request-ID the proxy adds) and body bytes match."""
    body = v2_body(iris_rows(random.Random(rows), rows), f"same-{rows}")
    # identity: MLServer gzips large bodies with a timestamp in the gzip header.
    headers = {**JSON, "Accept-Encoding": "identity"}
    direct = await fetch(client, mlserver.infer_url, body, headers)
    proxied = await fetch(client, f"{sidecar.proxy_url}/v2/models/iris/infer", body, headers)
    assert direct[0] == 200
    assert proxied == direct


async def test_gzipped_answers_pass_through_compressed(
    sidecar: Sidecar, mlserver: MLServer, client: aiohttp.ClientSession
) -> None:
    """A large answer MLServer gzips reaches the client gzipped, with the same JSON inside."""
    body = v2_body(iris_rows(random.Random(3), 60), "gzip-60")
    headers = {**JSON, "Accept-Encoding": "gzip"}
    direct = await fetch(client, mlserver.infer_url, body, headers)
    proxied = await fetch(client, f"{sidecar.proxy_url}/v2/models/iris/infer", body, headers)
    assert ("content-encoding", "gzip") in direct[1]
    assert proxied[:2] == direct[:2]
    assert gzip.decompress(proxied[2]) == gzip.decompress(direct[2])
    text = await scrape_until_steady(
        sidecar, lambda text: total(text, "ml_predictions_total") == 60
    )
    assert total(text, "ml_predictions_total", model_name="iris") == 60


async def test_wrong_feature_count_gets_mlservers_own_plain_text_500(
    sidecar: Sidecar, mlserver: MLServer, client: aiohttp.ClientSession
) -> None:
    """Three features instead of four: MLServer's text/plain 500 is relayed as it is."""
    body = json.dumps(
        {
            "inputs": [
                {"name": "input-0", "shape": [1, 3], "datatype": "FP64", "data": [5.1, 3.5, 1.4]}
            ]
        }
    ).encode()
    direct = await fetch(client, mlserver.infer_url, body, JSON)
    proxied = await fetch(client, f"{sidecar.proxy_url}/v2/models/iris/infer", body, JSON)
    assert proxied == direct
    status, headers, answer = proxied
    assert status == 500
    assert answer == b"Internal Server Error"
    assert ("content-type", "text/plain; charset=utf-8") in headers
    text = await scrape_until_steady(
        sidecar, lambda text: total(text, "ml_requests_total", code="500") == 1
    )
    assert total(text, "ml_requests_total", model_name="iris", code="500") == 1
    assert total(text, "ml_predictions_total") == 0
