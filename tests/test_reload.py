"""Config changes apply without a restart; a bad new config leaves the running one in place."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import msgspec
import pytest

from sidecar.config import RouteConfig
from tests.conftest import CannedUpstream, StartServe, assert_sample, sample, scrape

REJECTED = "new config rejected; still serving the previous one"
ECHO_ROUTE = "routes:\n  - {name: echo, method: POST, path: /echo}\n"


async def test_reload_swaps_routes_and_keeps_restart_settings(canned_upstream, start_sidecar):
    """New routes label traffic at once; a changed port is kept until restart."""
    sidecar = await start_sidecar(canned_upstream.url)
    new = msgspec.structs.replace(
        sidecar.config, routes=(RouteConfig(name="echo", path="/echo"),), port=1
    )
    sidecar.reload(new)
    async with (
        aiohttp.ClientSession() as session,
        session.post(sidecar.proxy_url + "/echo", data=b"x") as response,
    ):
        assert response.status == 200
    text = await scrape(sidecar)
    assert_sample(text, "ml_requests_total", 1, route="echo")
    assert sidecar.config.port == 0


async def _count(metrics_port: int, route: str) -> float | None:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return sample(await response.text(), "ml_requests_total", route=route)


async def _post_echo(port: int) -> None:
    url = f"http://127.0.0.1:{port}/echo"
    async with aiohttp.ClientSession() as session, session.post(url, data=b"x") as response:
        assert response.status == 200


@pytest.mark.parametrize("trigger", ["sighup", "file-watch"])
async def test_reload_from_file(
    canned_upstream: CannedUpstream, tmp_path: Path, serve: StartServe, trigger: str
):
    """A broken file is rejected and logged while the old config serves; a good one applies."""
    config = tmp_path / "sidecar.yaml"
    watch = 0.1 if trigger == "file-watch" else 0
    base = (
        f"upstream: {canned_upstream.url}\nhost: 127.0.0.1\nport: 0\n"
        f"metrics_port: 0\nconfig_watch_interval: {watch}\n"
    )
    config.write_text(base)
    served = await serve("--config", str(config))

    def changed() -> None:
        if trigger == "sighup":
            served.process.send_signal(signal.SIGHUP)

    try:
        port, metrics_port = await served.ports()
        config.write_text(base + "port: [\n")
        changed()
        rejected = await served.logged(REJECTED)
        assert "is not valid YAML" in str(rejected["error"])
        await _post_echo(port)
        assert await _count(metrics_port, "other") == 1

        config.write_text(base + ECHO_ROUTE)
        changed()
        await served.logged("config reloaded")
        await _post_echo(port)
        assert await _count(metrics_port, "echo") == 1
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert (await served.exited())[0] == 0
