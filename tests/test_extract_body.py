"""Reading bodies: which ones are parsed, compression, and JSON that orjson refuses."""

from __future__ import annotations

import gzip
import json
import math
import zlib

import pytest

from sidecar.extract import Extraction, MappingSpec, Message, build_extractor
from sidecar.extract import body as body_module

EXTRACT = build_extractor(None, MappingSpec(features="x", class_="y"))
REQUEST = json.dumps({"x": [[1, 2]]}).encode()
RESPONSE = json.dumps({"y": [1]}).encode()


def run(request: Message, response: Message) -> Extraction:
    return EXTRACT(request, response)


def test_json_content_types_with_parameters_and_suffixes_are_parsed():
    """`application/json; charset=utf-8` and `application/*+json` bodies are read."""
    result = run(
        Message(REQUEST, {"content-type": "application/json; charset=utf-8"}),
        Message(RESPONSE, {"content-type": "application/vnd.model+json"}),
    )

    assert result.errors == ()
    assert result.features is not None
    assert result.outputs.classes is not None


def test_a_body_without_content_type_is_parsed():
    """TorchServe sends no Content-Type on 200; the body is still JSON."""
    assert run(Message(REQUEST, {}), Message(RESPONSE, {})).batch_size == 1


@pytest.mark.parametrize(
    "content_type",
    ["text/csv", "application/vnd.apache.parquet", "application/octet-stream", "image/png"],
)
def test_non_json_content_types_are_skipped_without_error(content_type: str):
    """CSV, parquet, binary and image bodies are valid traffic, not parse errors."""
    result = run(Message(b"\x89PNG...", {"content-type": content_type}), Message(RESPONSE, {}))

    assert result.errors == ()
    assert result.features is None
    assert result.outputs.classes is not None


def test_triton_binary_tensor_bodies_are_skipped_on_either_side():
    """The inference-header-content-length header marks a binary body: skipped, no error."""
    binary = {"inference-header-content-length": "40", "content-type": "application/json"}

    result = run(Message(b'{"inputs":[...]}\x00\x01', binary), Message(b"{}\x00", binary))

    assert result == Extraction()


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-15)),
    ],
)
def test_compressed_bodies_are_decompressed(encoding: str, compress):
    """gzip and deflate (zlib-wrapped or raw) bodies are inflated before parsing."""
    headers = {"content-encoding": encoding}

    result = run(Message(compress(REQUEST), headers), Message(compress(RESPONSE), headers))

    assert result.errors == ()
    assert result.batch_size == 1


def test_encodings_we_cannot_undo_are_skipped_without_error():
    """A brotli or zstd body is not ours to read: no features, no error."""
    result = run(Message(b"\x0b\x02\x80", {"content-encoding": "br"}), Message(RESPONSE, {}))

    assert result.errors == ()
    assert result.features is None


def test_a_truncated_gzip_body_is_a_parse_error():
    """A gzip body cut short cannot be read: request_parse."""
    cut = gzip.compress(REQUEST)[:10]

    result = run(Message(cut, {"content-encoding": "gzip"}), Message(RESPONSE, {}))

    assert result.errors == ("request_parse",)


def test_a_body_already_decompressed_despite_its_header_is_still_read():
    """If a client decoded the body but the Content-Encoding header stayed, the JSON is read."""
    headers = {"content-encoding": "gzip"}

    result = run(Message(REQUEST, headers), Message(RESPONSE, {"content-encoding": "deflate"}))

    assert result.errors == ()
    assert result.batch_size == 1


def test_a_body_inflating_past_the_limit_is_a_parse_error():
    """Decompression stops at MAX_INFLATED_BYTES: a gzip bomb is a parse error, not an OOM."""
    bomb = gzip.compress(b'{"x": [' + b"0," * (body_module.MAX_INFLATED_BYTES // 2) + b"0]}", 1)
    assert len(bomb) < 1024 * 1024

    result = run(Message(bomb, {"content-encoding": "gzip"}), Message(RESPONSE, {}))

    assert result.errors == ("request_parse",)


def test_nan_and_infinity_literals_are_read_by_the_fallback_parser():
    """orjson rejects NaN/Infinity; the stdlib parser reads them as nan/inf."""
    result = run(Message(b'{"x": [[NaN, Infinity, -Infinity]]}', {}), Message(RESPONSE, {}))

    assert result.errors == ()
    assert result.features is not None
    row = result.features.numeric[0]
    assert math.isnan(row[0])
    assert row[1] == math.inf
    assert row[2] == -math.inf


def test_numbers_beyond_a_double_are_read_by_the_fallback_parser():
    """1e400 overflows orjson; it reads as inf, not as a parse error."""
    result = run(Message(b'{"x": [[1e400]]}', {}), Message(RESPONSE, {}))

    assert result.errors == ()
    assert result.features is not None
    assert result.features.numeric[0, 0] == math.inf


@pytest.mark.parametrize(
    "body",
    [b"{", b"3.17.2", b"\xff\xfe\x00", b'{"x": [1, 2,]}', b"Internal Server Error"],
)
def test_malformed_json_is_a_parse_error_on_its_side_only(body: bytes):
    """Malformed JSON is request_parse or response_parse; the other side is kept."""
    bad_request = run(Message(body, {}), Message(RESPONSE, {}))
    bad_response = run(Message(REQUEST, {}), Message(body, {}))

    assert bad_request.errors == ("request_parse",)
    assert bad_request.outputs.classes is not None
    assert bad_response.errors == ("response_parse",)
    assert bad_response.features is not None
