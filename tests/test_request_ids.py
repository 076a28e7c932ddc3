"""The request id the client sees is the one the prediction log keys rows by: the upstream's own
X-Request-ID when it sets one (TorchServe does), else the one the sidecar sent and added to the
reply (which `reply_request_id: false` turns off)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.demo.model import serve_app
from tests.conftest import StartSidecar
from tests.test_feedback import iris_settings, logged, post_feedback

ROW = [[5.1, 3.5, 1.4, 0.2]]


@pytest.fixture
async def own_id_model() -> AsyncIterator[str]:
    """A KServe V1 model that names each reply with an id of its own, whatever the request's."""
    numbers = itertools.count(1)

    async def predict(request: web.Request) -> web.Response:
        await request.read()
        headers = {"X-Request-ID": f"model-{next(numbers)}"}
        return web.json_response({"predictions": [0]}, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/models/iris:predict", predict)
    async with serve_app(app) as url:
        yield url


async def post_row(proxy_url: str) -> aiohttp.ClientResponse:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy_url}/v1/models/iris:predict", json={"instances": ROW}) as response,
    ):
        await response.read()
        return response


async def test_rows_are_logged_under_the_upstreams_own_id(
    own_id_model: str, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """The client got the model's id, not the sidecar's: feedback by that id is matched."""
    sidecar = await start_sidecar(own_id_model, **iris_settings(tmp_path / "log.db"))
    seen = [(await post_row(sidecar.proxy_url)).headers.getall("X-Request-ID") for _ in range(3)]
    assert seen == [["model-1"], ["model-2"], ["model-3"]]  # one id each: the model's
    await logged(sidecar, 3)
    items = [{"request_id": f"model-{n}", "label": "setosa"} for n in (1, 2, 3)]
    status, body = await post_feedback(sidecar, items)
    assert (status, body["matched"], body["unmatched"]) == (200, 3, 0)


async def test_the_sidecars_id_is_added_to_replies_by_default(
    toy_model: str, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    sidecar = await start_sidecar(toy_model, **iris_settings(tmp_path / "log.db"))
    response = await post_row(sidecar.proxy_url)
    (request_id,) = response.headers.getall("X-Request-ID")
    await logged(sidecar, 1)
    status, body = await post_feedback(sidecar, {"request_id": request_id, "label": "setosa"})
    assert (status, body["matched"]) == (200, 1)


async def test_reply_request_id_off_leaves_replies_as_the_upstream_sent_them(
    toy_model: str, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """No id is added; the client's own id is still the one rows are logged under."""
    settings = iris_settings(tmp_path / "log.db")
    sidecar = await start_sidecar(toy_model, reply_request_id=False, **settings)
    assert "X-Request-ID" not in (await post_row(sidecar.proxy_url)).headers
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{sidecar.proxy_url}/v1/models/iris:predict",
            json={"instances": ROW},
            headers={"X-Request-ID": "client-7"},
        ) as response,
    ):
        assert response.status == 200
    await logged(sidecar, 2)
    status, body = await post_feedback(sidecar, {"request_id": "client-7", "label": "setosa"})
    assert (status, body["matched"]) == (200, 1)
