"""From traffic to model metrics through a real proxy: presets, custom mappings and bad input."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, generate_latest

from sidecar import pipeline as pipeline_module
from sidecar.app import Sidecar, build_routes
from sidecar.config import RouteConfig, load
from sidecar.demo.model import CLASSES, serve_app
from sidecar.exchange import Exchange
from sidecar.extract.spec import MappingSpec
from sidecar.pipeline import Pipeline
from tests.conftest import StartSidecar, assert_sample, sample, scrape, settled


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    data = io.BytesIO(body) if len(body) > 1_000_000 else body  # aiohttp warns on big bytes
    async with session.post(url, data=data, headers=headers) as response:
        return response.status, await response.read()


IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [7.0, 3.2, 4.7, 1.4], [6.3, 3.3, 6.0, 2.5], [6.0, 2.9, 4.5, 1.5]]


async def classes_counted(sidecar: Sidecar, answers: list[tuple[int, bytes]]) -> tuple[str, int]:
    """Check that ml_predictions_total per class equals what the 200 answers returned; the
    scrape and the number of rows returned."""
    returned: Counter[str] = Counter()
    for status, answer in answers:
        assert status == 200
        for probabilities in json.loads(answer)["predictions"]:
            returned[CLASSES[probabilities.index(max(probabilities))]] += 1
    total = sum(returned.values())
    text = await settled(sidecar, "ml_prediction_confidence_count", total, model_name="iris")
    for name, count in returned.items():
        assert_sample(text, "ml_predictions_total", count, model_name="iris", **{"class": name})
    return text, total


async def test_kserve_preset_counts_every_returned_class(toy_model, start_sidecar: StartSidecar):
    """ml_predictions_total per class equals the classes the model actually returned."""
    sidecar = await start_sidecar(
        toy_model, preset="kserve-v1", mapping=MappingSpec(class_names=CLASSES)
    )
    answers = []
    async with aiohttp.ClientSession() as session:
        for size in (1, 2, 3, 4, 4, 2):
            body = json.dumps({"instances": IRIS_ROWS[:size]}).encode()
            answers.append(await post(session, f"{sidecar.proxy_url}/v1/models/iris:predict", body))
    text, total = await classes_counted(sidecar, answers)
    assert_sample(text, "ml_batch_size_sum", total, route="predict", model_name="iris")
    assert_sample(text, "ml_requests_total", 6, route="predict", code="200", model_name="iris")


async def test_bad_json_is_counted_and_the_reply_untouched(toy_model, start_sidecar):
    """Malformed JSON reaches the model as sent, its answer reaches the client, and it counts."""
    sidecar = await start_sidecar(toy_model, preset="kserve-v1")
    async with aiohttp.ClientSession() as session:
        direct = await post(session, f"{toy_model}/v1/models/iris:predict", b'{"instances": [[1,')
        proxied = await post(
            session, f"{sidecar.proxy_url}/v1/models/iris:predict", b'{"instances": [[1,'
        )
    assert proxied == direct
    assert proxied[0] == 400
    text = await scrape(sidecar)
    assert_sample(text, "ml_errors_total", 1, error_type="client_4xx", route="predict")


async def test_unparseable_success_counts_a_parse_error(canned_upstream, start_sidecar):
    """A 2xx whose request is not JSON: the reply passes, request_parse is counted."""
    route = RouteConfig(
        name="echo", method="POST", path="/echo", mapping=MappingSpec(features="instances")
    )
    sidecar = await start_sidecar(canned_upstream.url, routes=(route,))
    async with aiohttp.ClientSession() as session:
        status, body = await post(session, f"{sidecar.proxy_url}/echo", b"not json at all")
    assert (status, body) == (200, b"not json at all")
    await settled(sidecar, "ml_errors_total", 1, error_type="request_parse")


async def test_unparseable_or_misshapen_answers_count_instrumentation_errors(start_sidecar):
    """A JSON answer cut short counts response_parse, one of the wrong shape mapping: failures
    of the instrumentation only, as each answer reaches the client as the model sent it."""
    answers = {"/cut": b'{"predictions": [[0.1, 0.9', "/shape": b'{"predictions": "none"}'}

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answers[request.path], content_type="application/json")

    app = web.Application()
    app.router.add_post("/{name}", answer)
    mapping = MappingSpec(features="instances", probabilities="predictions")
    routes = tuple(
        RouteConfig(name=path[1:], method="POST", path=path, mapping=mapping) for path in answers
    )
    async with serve_app(app) as url, aiohttp.ClientSession() as session:
        sidecar = await start_sidecar(url, routes=routes)
        for path, sent in answers.items():
            body = b'{"instances": [[1.0, 2.0]]}'
            assert await post(session, sidecar.proxy_url + path, body) == (200, sent)
    text = await settled(sidecar, "ml_errors_total", 1, route="cut", error_type="response_parse")
    assert_sample(text, "ml_errors_total", 1, route="shape", error_type="mapping")
    for route in ("cut", "shape"):
        assert_sample(text, "ml_requests_total", 1, route=route, code="200")


async def test_custom_mapping_and_data_quality(canned_upstream, start_sidecar):
    """A JMESPath route yields classes and data-quality counts, with no preset at all."""
    route = RouteConfig(
        name="json",
        method="POST",
        path="/json",
        mapping=MappingSpec(
            features="instances",
            feature_names=("a", "b"),
            probabilities="predictions",
            class_names=("no", "yes"),
        ),
    )
    sidecar = await start_sidecar(canned_upstream.url, routes=(route,), model_name="custom")
    body = json.dumps({"instances": [[1.0, None]]}).encode()
    async with aiohttp.ClientSession() as session:
        status, _ = await post(session, f"{sidecar.proxy_url}/json", body)
    assert status == 200
    text = await settled(sidecar, "ml_predictions_total", 1, **{"class": "yes"})
    assert_sample(text, "ml_feature_missing_total", 1, feature="b", model_name="custom")


async def test_body_over_parse_limit_passes_unparsed(canned_upstream, start_sidecar):
    """Above max_body_bytes the exchange is relayed intact and counted as not parsed."""
    route = RouteConfig(name="echo", path="/echo", mapping=MappingSpec(features="instances"))
    sidecar = await start_sidecar(canned_upstream.url, routes=(route,), max_body_bytes=1000)
    body = json.dumps({"instances": [[1.0] * 500]}).encode()
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, f"{sidecar.proxy_url}/echo", body)
    assert (status, answer) == (200, body)
    text = await scrape(sidecar)
    assert_sample(text, "sidecar_dropped_observations_total", 1, reason="body_too_large")
    assert_sample(text, "ml_errors_total", None, error_type="request_parse")


async def test_payloads_beyond_the_record_queue_are_dropped_and_counted(
    canned_upstream, start_sidecar
):
    """With no room in the record queue (record_queue_size 0 here), the exchange is relayed
    and counted as a request, and its payload is dropped as queue_full instead of parsed."""
    mapping = MappingSpec(features="instances", probabilities="predictions", class_names=("n", "y"))
    route = RouteConfig(name="json", method="POST", path="/json", mapping=mapping)
    sidecar = await start_sidecar(canned_upstream.url, routes=(route,), record_queue_size=0)
    async with aiohttp.ClientSession() as session:
        status, _ = await post(session, f"{sidecar.proxy_url}/json", b'{"instances": [[1.0]]}')
    assert status == 200
    text = await settled(sidecar, "ml_requests_total", 1, route="json", code="200")
    assert_sample(text, "sidecar_dropped_observations_total", 1, reason="queue_full")
    assert_sample(text, "ml_predictions_total", None, **{"class": "y"})


async def test_model_names_from_paths_are_capped(toy_model, start_sidecar):
    """Model names taken from the path stop at label_cap; the rest are __other__."""
    sidecar = await start_sidecar(toy_model, preset="kserve-v1", label_cap=2)
    async with aiohttp.ClientSession() as session:
        for index in range(5):
            await post(session, f"{sidecar.proxy_url}/v1/models/m{index}:predict", b"{}")
    text = await scrape(sidecar)
    assert_sample(text, "ml_requests_total", 3, model_name="__other__", code="404")
    assert_sample(text, "sidecar_label_overflow_total", 3, label="model_name")


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("nan-literals", b'{"instances": [[NaN, Infinity, -Infinity, 1.0]]}'),
        ("non-numeric", b'{"instances": [["a", true, null, {"x": 1}]]}'),
        ("empty-batch", b'{"instances": []}'),
        ("deeply-nested", b'{"instances": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ("wrong-shape", b'{"instances": {"not": "rows"}}'),
    ],
)
async def test_bad_payloads_never_change_the_reply(canned_upstream, start_sidecar, name, body):
    """Whatever the payload, the client gets the upstream's bytes and the sidecar keeps going."""
    route = RouteConfig(name="echo", path="/echo", mapping=MappingSpec(features="instances"))
    sidecar = await start_sidecar(canned_upstream.url, routes=(route,))
    async with aiohttp.ClientSession() as session:
        assert await post(session, f"{sidecar.proxy_url}/echo", body) == (200, body)
        assert await post(session, f"{sidecar.proxy_url}/echo", b'{"instances": [[1]]}') == (
            200,
            b'{"instances": [[1]]}',
        )
    await settled(sidecar, "ml_requests_total", 2, route="echo")


async def test_nan_and_wrong_types_are_counted(canned_upstream, start_sidecar):
    """NaN and Infinity literals and strings in numeric features count as invalid."""
    route = RouteConfig(
        name="echo",
        path="/echo",
        mapping=MappingSpec(features="instances", feature_names=("a", "b", "c")),
    )
    sidecar = await start_sidecar(canned_upstream.url, routes=(route,))
    body = b'{"instances": [[NaN, Infinity, "x"], [1, 2, 3]]}'
    async with aiohttp.ClientSession() as session:
        assert await post(session, f"{sidecar.proxy_url}/echo", body) == (200, body)
    text = await settled(sidecar, "ml_feature_invalid_total", 1, feature="c", reason="wrong_type")
    assert_sample(text, "ml_feature_invalid_total", 1, feature="a", reason="nan")
    assert_sample(text, "ml_feature_invalid_total", 1, feature="b", reason="inf")


async def test_hundred_thousand_row_batch(toy_model, start_sidecar):
    """A 10^5-row batch is relayed and every row is counted."""
    sidecar = await start_sidecar(toy_model, preset="kserve-v1")
    rows = [[5.1, 3.5, 1.4, 0.2]] * 100_000
    async with aiohttp.ClientSession() as session:
        status, _ = await post(
            session,
            f"{sidecar.proxy_url}/v1/models/iris:predict",
            json.dumps({"instances": rows}).encode(),
        )
    assert status == 200
    await settled(sidecar, "ml_prediction_confidence_count", 100_000, model_name="iris")


async def test_drift_per_model_from_paths(canned_upstream, start_sidecar):
    """Two model names from the path get drift series of their own, side by side."""
    route = RouteConfig(
        name="echo", path="/echo/{model}", mapping=MappingSpec(features="instances")
    )
    sidecar = await start_sidecar(canned_upstream.url, routes=(route,))
    async with aiohttp.ClientSession() as session:
        for model in ("a", "b"):
            body = json.dumps({"instances": [[1.0, 2.0]]}).encode()
            assert (await post(session, f"{sidecar.proxy_url}/echo/{model}", body))[0] == 200
    for model in ("a", "b"):
        await settled(sidecar, "ml_drift_reference_frozen", 0, model_name=model)


async def test_concurrent_requests_are_counted_exactly(toy_model, start_sidecar: StartSidecar):
    """Exchanges that end together are read and recorded as one batch: every count stays exact."""
    sidecar = await start_sidecar(
        toy_model, preset="kserve-v1", mapping=MappingSpec(class_names=CLASSES)
    )
    sizes = [2 + i % 3 for i in range(300)]
    url = f"{sidecar.proxy_url}/v1/models/iris:predict"
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(
            *(
                post(session, url, json.dumps({"instances": IRIS_ROWS[:size]}).encode())
                for size in sizes
            )
        )
    text, total = await classes_counted(sidecar, answers)
    assert_sample(text, "ml_batch_size_count", len(sizes), route="predict", model_name="iris")
    assert_sample(text, "ml_batch_size_sum", total, route="predict", model_name="iris")
    assert_sample(text, "ml_requests_total", len(sizes), route="predict", code="200")
    assert_sample(text, "ml_request_duration_seconds_count", len(sizes), route="predict")


def iris_exchange(pipeline: Pipeline, path: str, request_id: str) -> None:
    """One kserve-v1 exchange through the pipeline, as the proxy reports it."""
    body = b'{"instances": [[1, 2, 3, 4]]}'
    answer = b'{"predictions": [[0.1, 0.7, 0.2]]}'
    headers = CIMultiDict({"Content-Type": "application/json"})
    ticket = pipeline.begin("POST", path)
    pipeline.end(
        ticket,
        Exchange(
            method="POST",
            path=path,
            status=200,
            request_id=request_id,
            request_headers=headers,
            response_headers=headers,
            request_body=body,
            response_body=answer,
            request_size=len(body),
            response_size=len(answer),
            upstream_seconds=0.001,
            total_seconds=0.002,
        ),
    )


def kserve_pipeline(**overrides: object) -> tuple[Pipeline, CollectorRegistry]:
    config = load(
        environ={},
        overrides={"upstream": "http://127.0.0.1:9", "preset": "kserve-v1", **overrides},
    )
    registry = CollectorRegistry()
    return Pipeline(config, build_routes(config), registry), registry


async def test_a_scrape_counts_exchanges_still_waiting_to_be_recorded():
    """Recording waits a moment to batch exchanges; a scrape in that moment still sees them."""
    pipeline, registry = kserve_pipeline()
    for n in range(3):
        iris_exchange(pipeline, "/v1/models/iris:predict", str(n))
    text = generate_latest(registry).decode()  # no turn of the event loop since the requests
    assert_sample(text, "ml_requests_total", 3, route="predict", code="200")
    assert_sample(text, "ml_predictions_total", 3, **{"class": "1"})


async def test_a_path_over_the_label_cap_counts_an_overflow_every_time():
    """begin() remembers each path's route and labels, but not a path whose model name was
    folded into __other__: every request to it is an overflow."""
    pipeline, registry = kserve_pipeline(label_cap=1)
    for n in range(4):
        iris_exchange(pipeline, "/v1/models/iris:predict", f"a{n}")
        iris_exchange(pipeline, "/v1/models/setosa:predict", f"b{n}")
    text = generate_latest(registry).decode()
    assert_sample(text, "ml_requests_total", 4, model_name="iris", code="200")
    assert_sample(text, "ml_requests_total", 4, model_name="__other__", code="200")
    assert_sample(text, "sidecar_label_overflow_total", 4, label="model_name")


async def test_a_reload_forgets_the_routes_remembered_per_path():
    pipeline, registry = kserve_pipeline()
    iris_exchange(pipeline, "/v1/models/iris:predict", "before")
    config = load(environ={}, overrides={"upstream": "http://127.0.0.1:9"})  # no preset
    pipeline.reconfigure(config, build_routes(config))
    iris_exchange(pipeline, "/v1/models/iris:predict", "after")
    text = generate_latest(registry).decode()
    assert_sample(text, "ml_requests_total", 1, route="predict")
    assert_sample(text, "ml_requests_total", 1, route="other")


def large_exchange(pipeline: Pipeline, rows: int) -> None:
    """One kserve-v1 exchange of `rows` rows through the pipeline, over LARGE_BODY_BYTES."""
    values = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, float("nan"), 2.5], [7.0, 3.2, 4.7, 1.4]]
    body = json.dumps({"instances": (values * rows)[:rows]}).encode()
    answer = json.dumps({"predictions": ([[0.1, 0.7, 0.2], [0.8, 0.1, 0.1]] * rows)[:rows]})
    headers = CIMultiDict({"Content-Type": "application/json"})
    ticket = pipeline.begin("POST", "/v1/models/iris:predict")
    pipeline.end(
        ticket,
        Exchange(
            method="POST",
            path="/v1/models/iris:predict",
            status=200,
            request_id="large",
            request_headers=headers,
            response_headers=headers,
            request_body=body,
            response_body=answer.encode(),
            request_size=len(body),
            response_size=len(answer),
            upstream_seconds=0.5,
            total_seconds=0.6,
        ),
    )


# Drift series that draw random numbers (PIT ties, the noise floor) or hang on where the window
# turns, which a batch's rows recorded in several steps move: the bins themselves do not.
_BY_STEPS = ("ml_drift_pit", "ml_drift_noise_floor", "ml_drift_score", "ml_drift_window")


def model_samples(registry: CollectorRegistry) -> list[str]:
    lines = generate_latest(registry).decode().splitlines()
    return sorted(
        line
        for line in lines
        if line.startswith("ml_") and "_created" not in line and not line.startswith(_BY_STEPS)
    )


async def test_a_large_exchange_is_recorded_as_a_small_one_would_be(monkeypatch):
    """Read in its thread a slice at a time and recorded RECORD_ROWS rows per turn of the loop,
    a 20,000-row exchange gives every model metric the value that reading it at once on the
    loop gives, drift bins included. (Drift's reference is frozen from a first, small exchange:
    one frozen from traffic takes whole batches, and the large one is recorded in several.)"""
    on_loop, on_loop_registry = kserve_pipeline()
    threaded, threaded_registry = kserve_pipeline()
    for pipeline in (on_loop, threaded):
        large_exchange(pipeline, 2_000)  # not large: 50 KB
        pipeline.flush()
    monkeypatch.setattr(pipeline_module, "LARGE_BODY_BYTES", 2**40)  # nothing is large
    large_exchange(on_loop, 20_000)
    on_loop.flush()
    monkeypatch.undo()
    large_exchange(threaded, 20_000)
    for _ in range(500):  # the last rows recorded are the last confidences counted
        text = generate_latest(threaded_registry).decode()
        if sample(text, "ml_prediction_confidence_count") == 22_000:
            break
        await asyncio.sleep(0.01)
    assert model_samples(threaded_registry) == model_samples(on_loop_registry)
    assert sample(generate_latest(threaded_registry).decode(), "ml_batch_size_sum") == 22_000
