"""Histogram bounds per metric (`buckets`), regression bounds that fit the model, OpenMetrics
units, and trace exemplars on the latency histograms."""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from sidecar import buckets
from sidecar.app import Sidecar
from sidecar.config import Config, ConfigError, load
from sidecar.exchange import Exchange
from sidecar.extract.types import Outputs
from sidecar.proxy.headers import trace_id
from sidecar.recorders.labels import OverflowCounter
from sidecar.recorders.outputs import OutputRecorder
from sidecar.recorders.red import RedRecorder
from tests.conftest import StartSidecar, scrape

UPSTREAM = {"SIDECAR_UPSTREAM": "http://127.0.0.1:9000"}
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"
ROW = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


async def openmetrics_scrape(sidecar: Sidecar) -> str:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sidecar.admin_url}/metrics", headers=headers) as response,
    ):
        assert response.content_type == "application/openmetrics-text"
        return await response.text()


async def test_configured_buckets_replace_the_defaults(
    toy_model: str, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(
        toy_model, preset="kserve-v1", buckets={"ml_request_duration_seconds": (0.5, 2.0)}
    )
    async with aiohttp.ClientSession() as session:
        await session.post(f"{sidecar.proxy_url}/v1/models/iris:predict", json=ROW)
    text = await scrape(sidecar)
    assert bounds_of(text, "ml_request_duration_seconds") == {"0.5", "2.0", "+Inf"}
    assert "0.005" in bounds_of(text, "ml_upstream_duration_seconds")  # the default, kept


def bounds_of(text: str, histogram: str) -> set[str]:
    return {
        line.split('le="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith(f"{histogram}_bucket")
    }


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"ml_latency": [1.0]}, "not a histogram of the sidecar"),
        ({"ml_batch_size": [1.0, 1.0]}, "must increase strictly"),
        ({"ml_batch_size": []}, "expected 1 to 64"),
        ({"ml_batch_size": [1.0, float("inf")]}, "must be finite"),
    ],
)
def test_bad_buckets_are_refused_with_the_metric_named(
    setting: dict[str, list[float]], words: str, tmp_path
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"buckets": setting}))
    with pytest.raises(ConfigError, match=words) as raised:
        load(path, environ=UPSTREAM)
    assert "buckets" in str(raised.value)


def test_regression_outputs_span_decades_without_a_profile() -> None:
    """A price of 250,000 lands in the (100k, 1M] bucket, not +Inf: its p99 reads true."""
    registry = CollectorRegistry()
    recorder = OutputRecorder(
        registry, overflow=OverflowCounter(registry), label_cap=5, low_confidence_threshold=0.7
    )
    recorder.record(("m", "v"), "r", Outputs(value=np.array([250_000.0, -0.5])), [2])
    labels = {"model_name": "m", "model_version": "v"}

    def count(le: str) -> float | None:
        return registry.get_sample_value("ml_prediction_value_bucket", {**labels, "le": le})

    assert count("100000.0") == 1  # -0.5 only
    assert count("1e+06") == 2
    assert count("-1.0") == 0


def test_regression_bounds_fit_a_profiles_outputs() -> None:
    edges = np.linspace(100.0, 900_000.0, 51).tolist()
    fitted = buckets.resolve({}, edges)["ml_prediction_value"]
    assert fitted[0] == 100.0
    assert fitted[-1] == 900_000.0
    assert 2 <= len(fitted) <= 12
    assert list(fitted) == sorted(set(fitted))
    # A configured bound list wins over the profile.
    assert buckets.resolve({"ml_prediction_value": (1.0,)}, edges)["ml_prediction_value"] == (1.0,)
    assert (
        buckets.resolve({}, [])["ml_prediction_value"]
        == buckets.DEFAULT_BUCKETS["ml_prediction_value"]
    )


def test_every_default_is_a_valid_setting() -> None:
    buckets.check_buckets(buckets.DEFAULT_BUCKETS)
    Config(upstream="http://127.0.0.1:9000", buckets=dict(buckets.DEFAULT_BUCKETS))


async def test_openmetrics_scrapes_carry_units_and_trace_exemplars(
    toy_model: str, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(toy_model, preset="kserve-v1")
    async with aiohttp.ClientSession() as session:
        for headers in ({"traceparent": TRACEPARENT}, {}):
            url = f"{sidecar.proxy_url}/v1/models/iris:predict"
            async with session.post(url, json=ROW, headers=headers) as response:
                assert response.status == 200
    text = await openmetrics_scrape(sidecar)
    assert "# UNIT ml_request_duration_seconds seconds" in text
    assert "# UNIT ml_request_size_bytes bytes" in text
    exemplars = [line for line in text.splitlines() if "# {" in line]
    names = {line.split("{", 1)[0] for line in exemplars}
    assert names == {"ml_request_duration_seconds_bucket", "ml_upstream_duration_seconds_bucket"}
    assert all(f'trace_id="{TRACE}"' in line for line in exemplars)


def traced_exchange(i: int) -> Exchange:
    """Exchange i, traced unless i is a multiple of 3."""
    return Exchange(
        method="POST",
        path="/p",
        status=200,
        request_id=str(i),
        request_headers={},
        response_headers={},
        request_body=None,
        response_body=None,
        request_size=10,
        response_size=10,
        upstream_seconds=0.001 * i,
        total_seconds=0.002 * i,
        trace_id=f"{i:032x}" if i % 3 else None,
    )


def test_exemplars_from_a_drain_of_many_exchanges_match_one_by_one() -> None:
    """record_many (a numpy pass) sets the same exemplars as observing each exchange."""
    exchanges = [traced_exchange(i) for i in range(1, 30)]
    one, many = CollectorRegistry(), CollectorRegistry()
    by_one, by_many = RedRecorder(one), RedRecorder(many)
    for exchange in exchanges:
        by_one.record(("m", "v"), "r", exchange)
    by_many.record_many(("m", "v"), "r", exchanges)

    def exemplar_lines(registry: CollectorRegistry) -> list[str]:
        encode, _ = choose_encoder("application/openmetrics-text")
        text = encode(registry).decode()
        return [line.rsplit(" ", 1)[0] for line in text.splitlines() if "# {" in line]

    assert exemplar_lines(many) == exemplar_lines(one)
    assert len(exemplar_lines(many)) > 3


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TRACEPARENT.encode(), TRACE),
        (None, None),
        (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", None),  # an all-zero id is invalid
        (b"ff-" + TRACE.encode() + b"-00f067aa0ba902b7-01", None),  # version ff is invalid
        (b"00-" + TRACE.upper().encode() + b"-00f067aa0ba902b7-01", None),  # lower-case only
        (b"garbage", None),
    ],
)
def test_trace_ids_are_read_from_valid_traceparents_only(
    header: bytes | None, expected: str | None
) -> None:
    assert trace_id(header) == expected
