"""Large payloads and aborted uploads (benchmarks/big_bodies.sh measures both): a large payload
is read beside the event loop and recorded all the same, and what a client leaves behind when
it gives up mid-upload goes by reference count, not when the cyclic collector gets to it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import struct
import threading
import weakref
from collections.abc import Iterator
from typing import Any
from unittest import mock

import aiohttp
import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import pipeline as pipeline_module
from sidecar.app import Sidecar
from sidecar.demo.model import CLASSES
from sidecar.extract import sliced
from sidecar.extract.spec import MappingSpec
from sidecar.memory import young_collections_only
from sidecar.pipeline import LARGE_BODY_BYTES
from sidecar.proxy.bodies import BodyBuffer
from sidecar.proxy.http1 import BodyReader, HttpConnection
from sidecar.proxy.pool import UpstreamConnection
from tests.conftest import StartSidecar, sample, settled
from tests.raw_http import connect
from tests.raw_http import post as raw_post
from tests.test_pipeline import classes_counted, post

PREDICT = "/v1/models/iris:predict"
MIB = 1024 * 1024


def rows_body(rows: int) -> bytes:
    return json.dumps(
        {"instances": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]] * (rows // 2)}
    ).encode()


class HeldRead:
    """The large exchanges' thread, made to wait for `release` as it starts reading one: a large
    exchange's reading is then known to be under way, in its thread, for as long as the test
    wants. It holds young_collections_only(), which the pipeline enters first, and which it
    looks up by name at each read in the plain and the compiled build (setup.py) alike."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        monkeypatch.setattr(pipeline_module, "young_collections_only", self._held)

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        self.started.set()
        assert self.release.wait(30)
        with young_collections_only():
            yield

    async def under_way(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 30)


async def predict(sidecar: Sidecar, body: bytes) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        return await post(session, f"{sidecar.proxy_url}{PREDICT}", body)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='ab,[]{}"\\ :'),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=100,
)


@given(document=JSON, slice_bytes=st.sampled_from([1, 4, 32]), indent=st.booleans())
def test_a_body_parsed_in_slices_is_the_body_parsed_at_once(document, slice_bytes, indent):
    """Brackets, commas and escaped quotes inside strings included, at any slice size."""
    body = orjson.dumps(document, option=orjson.OPT_INDENT_2 if indent else 0)
    with mock.patch.object(sliced, "SLICE_BYTES", slice_bytes):
        assert sliced.loads(body) == document


def parsed(parse: Any, body: bytes) -> object:
    try:
        return parse(body)
    except orjson.JSONDecodeError:
        return orjson.JSONDecodeError


@given(text=st.text(alphabet='[]{},"1a \\:', max_size=40))
def test_any_bytes_parse_in_slices_as_orjson_parses_them(text):
    """Not JSON ("[1,,2]", "[1,2}", a trailing comma) fails as it does at once."""
    body = text.encode()
    with mock.patch.object(sliced, "SLICE_BYTES", 1):
        assert parsed(sliced.loads, body) == parsed(orjson.loads, body)


CELL = st.integers(-5, 5) | st.floats(-5, 5) | st.none() | st.booleans() | st.sampled_from("ab")


def converted(convert: Any, rows: list[Any]) -> object:
    try:
        array = convert(rows)
    except ValueError as exc:
        return type(exc)
    return array.dtype, array.shape, array.tolist()


@given(rows=st.lists(st.lists(CELL, min_size=2, max_size=3) | CELL, max_size=12))
def test_rows_converted_in_chunks_are_numpys_at_once(rows):
    """The same array, dtype and shape included, or the same error."""
    with mock.patch.object(sliced, "CHUNK_ROWS", 2):
        assert converted(sliced.asarray, rows) == converted(np.asarray, rows)


async def test_a_large_payload_is_recorded_row_for_row(toy_model, start_sidecar: StartSidecar):
    """50,000 rows (over LARGE_BODY_BYTES, so read in the thread and recorded RECORD_ROWS at a
    time): every returned class is counted, and the batch is one batch."""
    sidecar = await start_sidecar(
        toy_model, preset="kserve-v1", mapping=MappingSpec(class_names=CLASSES)
    )
    body = rows_body(50_000)
    assert len(body) > LARGE_BODY_BYTES
    answer = await predict(sidecar, body)
    text, total = await classes_counted(sidecar, [answer])
    assert total == 50_000
    assert sample(text, "ml_batch_size_count", route="predict", model_name="iris") == 1
    assert sample(text, "ml_batch_size_sum", route="predict", model_name="iris") == 50_000
    assert sample(text, "sidecar_dropped_observations_total", reason="queue_full") is None


async def test_a_small_request_is_answered_while_a_large_payload_is_read(
    toy_model, start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
):
    """The large payload's parsing is held part-way in its thread; meanwhile a one-row request
    is answered and recorded. Released, the large one is recorded too."""
    held = HeldRead(monkeypatch)
    sidecar = await start_sidecar(toy_model, preset="kserve-v1")
    assert (await predict(sidecar, rows_body(20_000)))[0] == 200
    await held.under_way()
    assert (await predict(sidecar, rows_body(2)))[0] == 200
    text = await settled(sidecar, "ml_batch_size_count", 1, model_name="iris")
    assert sample(text, "ml_batch_size_sum", model_name="iris") == 2  # the small one only
    held.release.set()
    await settled(sidecar, "ml_batch_size_sum", 20_002, model_name="iris")


async def test_large_payloads_beyond_the_queue_are_dropped_and_counted(
    toy_model, start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
):
    """With one large exchange being read and large_body_queue_bytes taken, the next is relayed
    and counted as dropped; the one being read is recorded."""
    held = HeldRead(monkeypatch)
    sidecar = await start_sidecar(toy_model, preset="kserve-v1", large_body_queue_bytes=1)
    assert (await predict(sidecar, rows_body(20_000)))[0] == 200
    await held.under_way()
    assert (await predict(sidecar, rows_body(30_000)))[0] == 200
    await settled(sidecar, "sidecar_dropped_observations_total", 1, reason="large_body_queue_full")
    held.release.set()
    text = await settled(sidecar, "ml_batch_size_sum", 20_000, model_name="iris")
    assert sample(text, "ml_requests_total", route="predict", code="200") == 2


# Aborted uploads


class Connection:
    """A Flow that holds its body, as the proxy's connections do: the two refer to each other."""

    def __init__(self) -> None:
        self.body = BodyBuffer(self)

    def body_full(self) -> None:
        pass

    def body_drained(self) -> None:
        pass


@pytest.fixture
def no_collector():
    """The cyclic collector off: what is freed is freed by reference count."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


async def test_a_failed_body_and_its_connection_go_by_reference_count(no_collector):
    """The client left mid-body and the reader has seen the error (twice): neither the error
    kept on the buffer nor the buffer's hold on its connection leaves a cycle."""
    connection = Connection()
    connection.body.feed(b"half")
    connection.body.fail(ConnectionResetError("gone"))
    assert connection.body.read_nowait() == b"half"
    for _ in range(2):
        with pytest.raises(ConnectionResetError, match="gone"):
            connection.body.read_nowait()
    gone = weakref.ref(connection)
    del connection
    assert gone() is None


async def test_a_body_read_to_its_end_lets_go_of_its_connection(no_collector):
    """Once the whole body has arrived and been read, it holds its connection no more."""
    connection = Connection()
    connection.body.feed(b"x" * (2 * MIB))  # over HIGH_WATER: reading paused, then resumed
    connection.body.finish()
    assert len(connection.body.read_nowait() or b"") == 2 * MIB
    assert connection.body.at_eof()
    gone = weakref.ref(connection)
    del connection
    assert gone() is None


async def abort_upload(sidecar: Sidecar, length: int, expect: bool, reset: bool) -> None:
    """Announce `length` bytes and send half; with Expect, wait for the 100 Continue (the
    handler is reading the body by then); then leave."""
    reader, writer = await connect(sidecar.proxy_url)
    extra = [b"Expect: 100-continue"] if expect else []
    request = raw_post(PREDICT, b"[" * length, *extra)
    writer.write(request[: len(request) - length // 2])
    await writer.drain()
    if expect:
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
    if reset:  # close at once, with a reset
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


def left_over() -> list[str]:
    """Client connections and bodies still in memory, and upstream connections already closed
    (an open one is the readiness probe's, pooled and in use)."""
    kinds = (HttpConnection, BodyReader, UpstreamConnection)
    return sorted(
        type(o).__name__
        for o in gc.get_objects()
        if isinstance(o, kinds) and (not isinstance(o, UpstreamConnection) or o.closed)
    )


async def test_aborted_uploads_leave_nothing_to_the_cyclic_collector(
    toy_model, start_sidecar: StartSidecar, no_collector
):
    """Uploads given up half-way, with FIN or RST: read whole before the handler (1 MiB), by the
    handler (100 Continue), or streamed to the upstream as they come (2 MiB). Once the proxy
    has let go of them, no connection or body is left over, though the collector is off."""
    sidecar = await start_sidecar(toy_model, preset="kserve-v1")
    server = sidecar._proxy_server
    assert server is not None
    for length, expect in ((MIB, False), (MIB, True), (2 * MIB, False)):
        for reset in (False, True):
            for _ in range(5):
                await abort_upload(sidecar, length, expect, reset)
    for _ in range(500):  # the proxy lets go of each connection once its close is through
        if not server.connections and not left_over():
            break
        await asyncio.sleep(0.01)
    assert not server.connections
    assert left_over() == []
