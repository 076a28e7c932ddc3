"""One scrape for the pod (`upstream_metrics`): the model server's own exposition, served by a
real HTTP server here, fetched on each scrape of the admin port and exposed after ours; a family
that clashes with ours is dropped and reported; an upstream that is down, slow or too large
costs its families only. With --workers N the supervisor fetches it, once per scrape."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from sidecar import upstream_metrics
from tests.conftest import CannedUpstream, StartSidecar, assert_sample, sample, scrape
from tests.test_workers import supervisor

EXPOSITION = """\
# HELP model_server_requests_total Requests the model server answered.
# TYPE model_server_requests_total counter
model_server_requests_total{model="iris",code="200"} 7.0
model_server_requests_total{model="iris",code="500"} 1.0
# HELP model_server_latency_seconds Time to answer.
# TYPE model_server_latency_seconds histogram
model_server_latency_seconds_bucket{model="iris",le="0.1"} 3.0
model_server_latency_seconds_bucket{model="iris",le="+Inf"} 5.0
model_server_latency_seconds_sum{model="iris"} 1.5
model_server_latency_seconds_count{model="iris"} 5.0
# HELP model_server_models_loaded Models in memory.
# TYPE model_server_models_loaded gauge
model_server_models_loaded 1.0
"""
# The sidecar's own RED counter, as a model server might also call its own.
CLASHING = """\
# HELP ml_requests_total Not the sidecar's.
# TYPE ml_requests_total counter
ml_requests_total{code="200"} 999.0
"""


@dataclass
class MetricsServer:
    """A model server's metrics port: /metrics answers `text` with `status`, after `delay`
    seconds; `requests` counts the fetches."""

    text: str = EXPOSITION
    status: int = 200
    delay: float = 0.0
    requests: int = 0
    url: str = ""

    async def handle(self, request: web.BaseRequest) -> web.Response:
        self.requests += 1
        await asyncio.sleep(self.delay)
        return web.Response(text=self.text, status=self.status, content_type="text/plain")


@pytest.fixture
async def metrics_server() -> AsyncIterator[MetricsServer]:
    server = MetricsServer()
    runner = web.ServerRunner(web.Server(server.handle, access_log=None), shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    yield server
    await runner.cleanup()


def samples(text: str) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    """(name, labels, value) of every sample of an exposition."""
    return {
        (metric.name, tuple(sorted(metric.labels.items())), float(metric.value))
        for family in text_string_to_metric_families(text)
        for metric in family.samples
    }


async def test_the_upstream_families_follow_ours_unchanged(
    canned_upstream: CannedUpstream, start_sidecar: StartSidecar, metrics_server: MetricsServer
) -> None:
    """Every sample of the model server's exposition is in ours, names, labels and values as
    they were; ours are there too; each scrape fetches once, and says it did."""
    sidecar = await start_sidecar(canned_upstream.url, upstream_metrics=metrics_server.url)
    text = await scrape(sidecar)
    assert samples(EXPOSITION) <= samples(text)
    assert sample(text, "ml_model_info", model_name="model") == 1
    assert_sample(text, "sidecar_upstream_metrics_up", 1)
    duration = sample(text, "sidecar_upstream_metrics_scrape_duration_seconds")
    assert duration is not None
    assert 0 < duration < 2
    assert metrics_server.requests == 1
    families = [family.name for family in text_string_to_metric_families(text)]
    assert families.index("model_server_requests") > families.index("ml_model_info")  # after ours


async def test_openmetrics_scrapers_get_the_upstream_families_too(
    canned_upstream: CannedUpstream, start_sidecar: StartSidecar, metrics_server: MetricsServer
) -> None:
    """Asked for OpenMetrics, the whole exposition, upstream families included, is valid
    OpenMetrics ending in one # EOF."""
    sidecar = await start_sidecar(canned_upstream.url, upstream_metrics=metrics_server.url)
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sidecar.admin_url}/metrics", headers=accept) as response,
    ):
        text = await response.text()
    parsed = openmetrics_parser.text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    names = {family.name for family in parsed}
    assert {"model_server_requests", "model_server_latency_seconds", "ml_model_info"} <= names
    assert text.count("# EOF") == 1


# Triton's counters are declared without _total.
TRITON = """\
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="iris",version="1"} 10
"""


@pytest.mark.parametrize(
    "accept", ["text/plain; version=0.0.4", "application/openmetrics-text; version=1.0.0"]
)
async def test_a_counter_without_total_keeps_its_name(
    canned_upstream: CannedUpstream,
    start_sidecar: StartSidecar,
    metrics_server: MetricsServer,
    accept: str,
) -> None:
    """A counter the upstream named without _total goes out under its own name in either
    format, where a counter's samples would have had _total appended."""
    metrics_server.text = TRITON
    sidecar = await start_sidecar(canned_upstream.url, upstream_metrics=metrics_server.url)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sidecar.admin_url}/metrics", headers={"Accept": accept}) as response,
    ):
        lines = (await response.text()).splitlines()
    assert 'nv_inference_request_success{model="iris",version="1"} 10.0' in lines
    assert not any(line.startswith("nv_inference_request_success_total") for line in lines)


async def test_a_family_that_clashes_with_ours_is_dropped_and_reported(
    canned_upstream: CannedUpstream,
    start_sidecar: StartSidecar,
    metrics_server: MetricsServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The model server's ml_requests_total is not merged into ours (one name, two families,
    would make the scrape invalid): it is named in sidecar_upstream_metrics_clashes and in a
    log line; its other families are exposed."""
    metrics_server.text = EXPOSITION + CLASHING
    sidecar = await start_sidecar(canned_upstream.url, upstream_metrics=metrics_server.url)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.proxy_url}/echo", data=b"x") as response:
            assert response.status == 200
        with caplog.at_level(logging.WARNING, logger="sidecar.upstream_metrics"):
            text = await scrape(sidecar)
    names = [family.name for family in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert sample(text, "ml_requests_total", code="200") != 999
    assert_sample(text, "sidecar_upstream_metrics_clashes", 1, family="ml_requests")
    assert samples(EXPOSITION) <= samples(text)
    assert_sample(text, "sidecar_upstream_metrics_up", 1)
    assert any("share a name" in record.getMessage() for record in caplog.records)


async def test_many_clashes_are_capped(
    canned_upstream: CannedUpstream,
    start_sidecar: StartSidecar,
    metrics_server: MetricsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past MAX_CLASHES family names, the rest are counted under __other__."""
    monkeypatch.setattr(upstream_metrics, "MAX_CLASHES", 1)
    metrics_server.text = CLASHING + "# TYPE ml_model_info gauge\nml_model_info 5.0\n"
    sidecar = await start_sidecar(canned_upstream.url, upstream_metrics=metrics_server.url)
    text = await scrape(sidecar)
    assert_sample(text, "sidecar_upstream_metrics_clashes", 1, family="ml_requests")
    assert_sample(text, "sidecar_upstream_metrics_clashes", 1, family="__other__")


async def test_an_upstream_that_is_down_costs_its_families_only(
    canned_upstream: CannedUpstream, start_sidecar: StartSidecar, refusing_url: str
) -> None:
    """Nothing listens at upstream_metrics: the scrape is a 200 with our metrics and up 0."""
    sidecar = await start_sidecar(canned_upstream.url, upstream_metrics=f"{refusing_url}/metrics")
    text = await scrape(sidecar)
    assert sample(text, "ml_model_info", model_name="model") == 1
    assert_sample(text, "sidecar_upstream_metrics_up", 0)


@pytest.mark.parametrize(
    ("status", "text"),
    [(500, "Internal Server Error"), (200, "<html>not metrics</html>\n"), (200, "x" * 200)],
    ids=["error-status", "not-an-exposition", "too-large"],
)
async def test_what_is_not_an_exposition_is_not_exposed(
    canned_upstream: CannedUpstream,
    start_sidecar: StartSidecar,
    metrics_server: MetricsServer,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    text: str,
) -> None:
    """An error status, a page that is no exposition, or one over the size bound: up 0."""
    monkeypatch.setattr(upstream_metrics, "MAX_EXPOSITION_BYTES", 100)
    metrics_server.status, metrics_server.text = status, text
    sidecar = await start_sidecar(canned_upstream.url, upstream_metrics=metrics_server.url)
    scraped = await scrape(sidecar)
    assert_sample(scraped, "sidecar_upstream_metrics_up", 0)
    assert sample(scraped, "ml_model_info", model_name="model") == 1


async def test_a_slow_upstream_is_bounded_by_the_timeout(
    canned_upstream: CannedUpstream, start_sidecar: StartSidecar, metrics_server: MetricsServer
) -> None:
    """An upstream that takes 10 s: the scrape answers after upstream_metrics_timeout, with
    our metrics and up 0."""
    metrics_server.delay = 10.0
    sidecar = await start_sidecar(
        canned_upstream.url, upstream_metrics=metrics_server.url, upstream_metrics_timeout=0.3
    )
    started = time.monotonic()
    text = await scrape(sidecar)
    assert time.monotonic() - started < 2.0
    assert_sample(text, "sidecar_upstream_metrics_up", 0)
    duration = sample(text, "sidecar_upstream_metrics_scrape_duration_seconds")
    assert duration is not None
    assert 0.25 <= duration < 1.0  # the loop's clock may fire the timeout a hair early
    assert sample(text, "ml_model_info", model_name="model") == 1


async def test_the_supervisor_fetches_once_per_scrape(
    canned_upstream: CannedUpstream, metrics_server: MetricsServer
) -> None:
    """--workers 2: the supervisor's /metrics holds the upstream families once, and each scrape
    is one fetch (the workers fetch nothing)."""
    async with (
        supervisor(canned_upstream.url, "--upstream-metrics", metrics_server.url) as running,
        aiohttp.ClientSession() as session,
    ):
        for scrapes in (1, 2):
            async with session.get(running.metrics) as response:
                text = await response.text()
            assert samples(EXPOSITION) <= samples(text)
            names = [family.name for family in text_string_to_metric_families(text)]
            assert names.count("model_server_requests") == 1
            assert metrics_server.requests == scrapes
