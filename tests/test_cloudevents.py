"""The CloudEvents sink end to end: a real sidecar in front of the toy iris model sends each
prediction, in binary content mode, to a real HTTP receiver on an ephemeral port that records the
headers and bodies. Then the receiver is late, refuses, is slow (the queue fills, the proxy does
not wait), comes back, or is still owed events when the sidecar stops."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.config import ConfigError, load
from sidecar.demo.model import CLASSES, FEATURES
from sidecar.extract.spec import MappingSpec
from sidecar.feedback.settings import FeedbackSettings
from tests.conftest import StartSidecar, assert_sample, sample, scrape, scrape_until, settled

SOURCE = "/tests/sidecar-a"
EVENTS = "sidecar_prediction_sink_events_total"
DROPPED = "sidecar_dropped_observations_total"
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3]]


@dataclass(frozen=True)
class Received:
    """One event as the receiver saw it."""

    path: str
    headers: dict[str, str]  # names in lower case
    body: Any
    peer: tuple[str, int]  # the sidecar's end of the connection it came on


@dataclass
class Receiver:
    """A CloudEvents HTTP receiver on a port bound from the start: until `listen`, connections
    to it are refused. It answers `status` after `delay` seconds, both changeable at any time."""

    sock: socket.socket
    delay: float = 0.0
    status: int = 202  # what a Knative broker answers
    events: list[Received] = field(default_factory=list)
    runner: web.ServerRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    async def listen(self, keepalive_timeout: float = 75.0) -> None:
        """Accept connections, closing those idle for `keepalive_timeout` seconds."""
        server = web.Server(self._handle, access_log=None, keepalive_timeout=keepalive_timeout)
        self.runner = web.ServerRunner(server)
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock).start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        self.sock.close()

    def ids(self) -> list[str]:
        return [unquote(event.headers["ce-id"]) for event in self.events]

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.events.append(Received(request.path_qs, headers, json.loads(body), peer))
        await asyncio.sleep(self.delay)
        return web.Response(status=self.status)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    receiver = Receiver(sock)
    yield receiver
    await receiver.close()


@dataclass(frozen=True)
class Answer:
    request_id: str  # the X-Request-ID the client got back
    rows: list[list[float]]
    probabilities: list[list[float]]


async def predict(
    client: aiohttp.ClientSession, sidecar: Sidecar, rows: int, request_id: str | None = None
) -> Answer:
    sent = ROWS[:rows]
    headers = {"X-Request-ID": request_id} if request_id is not None else {}
    url = f"{sidecar.proxy_url}/v1/models/iris:predict"
    async with client.post(url, json={"instances": sent}, headers=headers) as response:
        assert response.status == 200
        answer = await response.json()
    return Answer(response.headers["X-Request-ID"], sent, answer["predictions"])


async def predict_many(client: aiohttp.ClientSession, sidecar: Sidecar, count: int) -> list[str]:
    """`count` one-row predictions in turn; their request ids."""
    return [(await predict(client, sidecar, 1)).request_id for _ in range(count)]


def sink_settings(url: str, **settings: Any) -> dict[str, Any]:
    """The toy model behind the kserve-v1 preset, predictions sent to `url` and logged nowhere
    else: the sink needs no store."""
    return {
        "preset": "kserve-v1",
        "model_name": "iris",
        "model_version": "3",
        "mapping": MappingSpec(class_names=CLASSES, feature_names=FEATURES),
        "feedback": FeedbackSettings(sink_url=url, sink_source=SOURCE, **settings),
    }


def value(text: str, name: str, **labels: str) -> float:
    found = sample(text, name, **labels)
    return 0.0 if found is None else found


def registry_value(sidecar: Sidecar, name: str, **labels: str) -> float:
    """A sample read from the registry, for a sidecar whose admin port has closed."""
    return sidecar.registry.get_sample_value(name, labels) or 0.0


async def test_each_prediction_arrives_as_one_cloudevent_named_by_its_request_id(
    toy_model: str, receiver: Receiver, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    """12 requests of 1 to 3 rows, ids given by the client or by the sidecar: 12 events, each
    with ce-id = the X-Request-ID the client got back (percent-encoded where the binding says),
    the KServe headers, and the request's rows as its body, all over one connection."""
    await receiver.listen()
    sidecar = await start_sidecar(toy_model, **sink_settings(f"{receiver.url}/events?tenant=a"))
    began = time.time() - 0.001  # ce-time has milliseconds
    given = [None] * 9 + ["req-b", "req c", 'order 17 "gold" 100%']
    answers = [
        await predict(client, sidecar, index % 3 + 1, request_id)
        for index, request_id in enumerate(given)
    ]
    text = await settled(sidecar, EVENTS, 12, outcome="sent")
    ended = time.time()

    assert sorted(receiver.ids()) == sorted(answer.request_id for answer in answers)
    events = {unquote(event.headers["ce-id"]): event for event in receiver.events}
    assert events['order 17 "gold" 100%'].headers["ce-id"] == "order%2017%20%22gold%22%20100%25"
    for answer in answers:
        event = events[answer.request_id]
        assert event.path == "/events?tenant=a"
        headers = event.headers
        assert headers["content-type"] == "application/json"
        assert (headers["ce-specversion"], headers["ce-type"]) == ("1.0", "io.sidecar.prediction")
        assert unquote(headers["ce-source"]) == SOURCE
        assert (headers["ce-inferenceservicename"], headers["ce-modelversion"]) == ("iris", "3")
        assert began <= datetime.fromisoformat(headers["ce-time"]).timestamp() <= ended
        assert "ce-datacontenttype" not in headers  # binary mode: Content-Type says it
        assert len(event.body) == len(answer.rows)
        for row, (item, features, probabilities) in enumerate(
            zip(event.body, answer.rows, answer.probabilities, strict=True)
        ):
            best = max(range(len(CLASSES)), key=probabilities.__getitem__)
            assert item["request_id"] == answer.request_id
            assert (item["row"], item["model_name"], item["model_version"]) == (row, "iris", "3")
            assert item["prediction"] == CLASSES[best]
            assert item["probability"] == pytest.approx(probabilities[best])
            assert item["features"] == dict(zip(FEATURES, features, strict=True))
            assert item["latency_ms"] > 0
    assert len({event.peer for event in receiver.events}) == 1  # one keep-alive connection
    assert_sample(text, EVENTS, 0, outcome="retried")
    assert_sample(text, EVENTS, 0, outcome="dropped")


async def test_a_connection_the_receiver_closed_while_idle_is_replaced_without_a_retry(
    toy_model: str, receiver: Receiver, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    """Receivers close idle keep-alive connections (this one after 0.1 s). The next event finds
    its connection closed, goes again at once on a new one, and counts as no retry."""
    await receiver.listen(keepalive_timeout=0.1)
    sidecar = await start_sidecar(toy_model, **sink_settings(receiver.url))
    first = await predict_many(client, sidecar, 1)
    await settled(sidecar, EVENTS, 1, outcome="sent")
    await asyncio.sleep(0.4)  # the receiver closes the idle connection
    second = await predict_many(client, sidecar, 1)
    text = await settled(sidecar, EVENTS, 2, outcome="sent")
    assert receiver.ids() == [*first, *second]
    assert len({event.peer for event in receiver.events}) == 2
    assert_sample(text, EVENTS, 0, outcome="retried")


async def test_events_wait_for_a_receiver_that_comes_up_within_the_retry_budget(
    toy_model: str, receiver: Receiver, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    """The receiver refuses connections at first: the first event is retried (the others wait
    behind it) and, once it listens, all three arrive; nothing is dropped."""
    sidecar = await start_sidecar(toy_model, **sink_settings(receiver.url))
    ids = await predict_many(client, sidecar, 3)
    await scrape_until(sidecar, lambda text: value(text, EVENTS, outcome="retried") >= 1)
    await receiver.listen()
    text = await settled(sidecar, EVENTS, 3, outcome="sent")
    assert receiver.ids() == ids  # in order
    assert value(text, EVENTS, outcome="retried") >= 1
    assert_sample(text, EVENTS, 0, outcome="dropped")
    assert_sample(text, DROPPED, 0, reason="prediction_sink_error")


async def test_an_event_is_given_up_after_its_attempts_and_counted(
    toy_model: str, receiver: Receiver, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    """A receiver that never comes up: each event is tried 3 times (2 retries), then dropped."""
    settings = sink_settings(receiver.url, sink_attempts=3, sink_backoff=0.02)
    sidecar = await start_sidecar(toy_model, **settings)
    await predict_many(client, sidecar, 2)
    text = await settled(sidecar, DROPPED, 2, reason="prediction_sink_error")
    assert_sample(text, EVENTS, 2, outcome="dropped")
    assert_sample(text, EVENTS, 4, outcome="retried")
    assert_sample(text, EVENTS, 0, outcome="sent")


@pytest.mark.parametrize(("status", "tries"), [(400, 1), (404, 1), (429, 3), (503, 3)])
async def test_only_answers_that_mean_not_now_are_retried(
    toy_model: str,
    receiver: Receiver,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
    status: int,
    tries: int,
) -> None:
    """A 4xx says the same event will fail the same way: given up at once. 429 and 5xx say
    "not now": tried until the attempts run out."""
    await receiver.listen()
    receiver.status = status
    settings = sink_settings(receiver.url, sink_attempts=3, sink_backoff=0.01)
    sidecar = await start_sidecar(toy_model, **settings)
    ids = await predict_many(client, sidecar, 2)
    text = await settled(sidecar, DROPPED, 2, reason="prediction_sink_error")
    assert receiver.ids() == [ids[0]] * tries + [ids[1]] * tries
    assert_sample(text, EVENTS, 2 * (tries - 1), outcome="retried")
    assert_sample(text, EVENTS, 0, outcome="sent")


async def test_a_slow_receiver_fills_the_queue_not_the_replies_and_events_flow_once_it_recovers(
    toy_model: str, receiver: Receiver, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    """The receiver takes 2 s per event and the queue holds 4: of 30 requests, most events are
    dropped as `prediction_sink_full`, yet every reply comes at once (none waits for the sink).
    Once the receiver is quick again, what was queued and what comes after arrives."""
    await receiver.listen()
    receiver.delay = 2.0
    sidecar = await start_sidecar(toy_model, **sink_settings(receiver.url, sink_queue_size=4))
    seconds = []
    ids = []
    for _ in range(30):
        started = time.perf_counter()
        ids.append((await predict(client, sidecar, 1)).request_id)
        seconds.append(time.perf_counter() - started)
    assert max(seconds) < 1.0, seconds  # a reply that waited for the receiver would take 2 s

    # The queue took its 4 (and the thread one more, unless all came in one drain); the rest
    # waited for nothing and were dropped.
    full = value(await scrape(sidecar), DROPPED, reason="prediction_sink_full")
    assert 0 < full <= 30 - 4
    receiver.delay = 0.0
    text = await settled(sidecar, EVENTS, 30 - full, outcome="sent")
    kept = receiver.ids()
    assert kept == [request_id for request_id in ids if request_id in set(kept)]  # in order
    assert len(kept) == 30 - full
    assert_sample(text, EVENTS, full, outcome="dropped")

    later = await predict_many(client, sidecar, 3)  # fit in the queue, even if drained together
    text = await settled(sidecar, EVENTS, 33 - full, outcome="sent")
    assert receiver.ids() == [*kept, *later]
    assert_sample(text, DROPPED, full, reason="prediction_sink_full")
    assert_sample(text, DROPPED, 0, reason="prediction_sink_error")


async def test_events_still_queued_are_sent_before_the_sidecar_stops(
    toy_model: str, receiver: Receiver, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    await receiver.listen()
    receiver.delay = 0.1
    sidecar = await start_sidecar(toy_model, **sink_settings(receiver.url))
    ids = await predict_many(client, sidecar, 5)
    await sidecar.stop()
    assert receiver.ids() == ids
    assert registry_value(sidecar, EVENTS, outcome="sent") == 5


async def test_a_receiver_that_is_down_does_not_hold_up_shutdown(
    toy_model: str, receiver: Receiver, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    """Retries stop when the sidecar does: with the first event 5 to 10 s from its retry, the
    sidecar stops at once and counts the events it could not send."""
    settings = sink_settings(receiver.url, sink_backoff=10.0)
    sidecar = await start_sidecar(toy_model, **settings)
    await predict_many(client, sidecar, 3)
    await asyncio.sleep(0.3)  # the first event's first attempt is refused, its backoff begins
    started = time.perf_counter()
    await sidecar.stop()
    assert time.perf_counter() - started < 2.0
    assert registry_value(sidecar, DROPPED, reason="prediction_sink_error") == 3
    assert registry_value(sidecar, EVENTS, outcome="sent") == 0


@pytest.mark.parametrize(
    ("feedback", "expected"),
    [
        (
            {"sink_url": "kafka://b:9092"},
            "sink_url 'kafka://b:9092' must be an http:// or https://",
        ),
        (
            {"sink_url": "http://b:port/"},
            "sink_url 'http://b:port/' must be an http:// or https://",
        ),
        ({"sink_queue_size": 0}, "sink_queue_size must be positive, got 0"),
        ({"sink_attempts": 0}, "sink_attempts must be positive, got 0"),
        ({"sink_backoff": -1}, "sink_backoff must be 0 or more seconds, got -1"),
        ({"sink_source": ""}, "sink_source must not be empty"),
        (
            {"sink_timeout": "soon"},
            "key `feedback.sink_timeout` has value 'soon'; expected `float`",
        ),
    ],
)
def test_sink_settings_errors_name_the_key_the_value_and_what_was_expected(
    tmp_path: Path, feedback: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "sidecar.yaml"
    config = {"upstream": "http://127.0.0.1:9000", "feedback": feedback}
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    with pytest.raises(ConfigError) as error:
        load(path, environ={})
    assert expected in str(error.value)
    assert f"from config file {path}" in str(error.value)
