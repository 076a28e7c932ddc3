"""Server-sent events split into events, and the inject_usage rewrite and filter, byte for byte."""

from __future__ import annotations

import json

import pytest

from sidecar.extract.sse import Event, EventSplitter, split_events
from sidecar.proxy.usage import UsageFilter, ask_for_usage, usage_filter
from tests.fixtures_util import exchange

STREAM = exchange("openai", "chat_completion_stream").response.body
USAGE_EVENT = next(
    b"data: " + line + b"\n\n"
    for line in (part.removeprefix(b"data: ") for part in STREAM.split(b"\n\n"))
    if b'"choices":[]' in line
)


def feed_in_pieces(splitter: EventSplitter, stream: bytes, cuts: list[int]) -> list[Event]:
    events = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        events += splitter.feed(stream[start:end], final=end == len(stream))
    return events


class TestEventSplitter:
    def test_fixture_stream_is_six_events_and_done(self):
        """The documented stream: role, three pieces, finish, usage, then [DONE]."""
        events = split_events(STREAM)

        assert len(events) == 7
        assert events[-1].data == b"[DONE]"
        assert b"".join(STREAM[e.start : e.end] for e in events) == STREAM
        assert all(
            json.loads(e.data or b"")["object"] == "chat.completion.chunk" for e in events[:-1]
        )

    @pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
    def test_every_line_ending_ends_lines(self, newline: bytes):
        """CRLF, LF and CR all end a line; a blank line ends the event; data lines join with LF."""
        stream = newline.join([b"data: a", b"data:b", b": comment", b"id: 1", b"", b""])

        assert split_events(stream) == [Event(0, len(stream), b"a\nb")]

    def test_comments_and_fields_without_data_are_events_without_data(self):
        """A keep-alive comment has no data: it is reported, so that its bytes can be relayed."""
        assert split_events(b": ping\n\nevent: x\n\n") == [Event(0, 8, None), Event(8, 18, None)]

    def test_data_field_without_colon_or_space(self):
        """`data` alone is an empty data line; only one leading space is dropped."""
        assert [e.data for e in split_events(b"data\n\ndata:  two\n\n")] == [b"", b" two"]

    def test_unterminated_tail_is_not_an_event(self):
        """An event whose blank line never came was not complete."""
        assert split_events(b"data: a\n\ndata: b\n") == [Event(0, 9, b"a")]

    @pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
    def test_any_split_of_the_stream_gives_the_same_events(self, newline: bytes):
        """Events do not depend on where the network cut the bytes, CRLF halves included."""
        stream = STREAM.replace(b"\n", newline)
        whole = split_events(stream)
        for cut in range(1, len(stream)):
            assert feed_in_pieces(EventSplitter(), stream, [cut]) == whole
        assert feed_in_pieces(EventSplitter(), stream, list(range(1, len(stream)))) == whole


class TestAskForUsage:
    def test_usage_is_spliced_in_and_every_other_byte_kept(self):
        """A stream request without stream_options gains it after the brace; nothing else moves."""
        body = b' {"model": "m",  "stream": true, "temperature": 0.70}'
        headers = [(b"Content-Type", b"application/json"), (b"Content-Length", b"52")]

        request = ask_for_usage(headers, body)

        assert request.rewritten
        assert request.body == b' {"stream_options":{"include_usage":true},' + body[2:]
        assert json.loads(request.body)["stream_options"] == {"include_usage": True}
        assert request.headers == [(b"Content-Type", b"application/json")]

    def test_existing_stream_options_gain_include_usage(self):
        """Other stream options are kept."""
        body = b'{"stream": true, "stream_options": {"include_usage": false, "x": 1}}'

        request = ask_for_usage([], body)

        assert json.loads(request.body)["stream_options"] == {"include_usage": True, "x": 1}

    @pytest.mark.parametrize(
        "body",
        [
            b'{"stream": true, "stream_options": {"include_usage": true}}',  # asked itself
            b'{"stream": true, "stream_options": {"continuous_usage_stats": true}}',
            b'{"stream": false}',
            b'{"model": "m"}',
            b"[1, 2]",
            b'{"stream": true',
            b"",
        ],
    )
    def test_other_requests_go_unchanged(self, body: bytes):
        """Not a stream, already asking, or not JSON: the request passes as it came."""
        headers = [(b"Content-Length", str(len(body)).encode())]

        assert ask_for_usage(headers, body) == (headers, body, False)

    def test_compressed_request_goes_unchanged(self):
        """A body we would have to inflate and deflate again is not touched."""
        headers = [(b"Content-Encoding", b"gzip")]

        assert not ask_for_usage(headers, b'{"stream": true}').rewritten


class TestUsageFilter:
    def test_only_the_usage_event_is_removed(self):
        """The client gets the stream without the usage chunk; every other byte is the same."""
        assert UsageFilter()(STREAM, True) == STREAM.replace(USAGE_EVENT, b"")

    @pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
    def test_any_split_gives_the_same_bytes(self, newline: bytes):
        """Wherever the chunks break, what goes out is the stream less the usage event."""
        stream = STREAM.replace(b"\n", newline)
        expected = stream.replace(USAGE_EVENT.replace(b"\n", newline), b"")
        for cut in range(1, len(stream)):
            strip = UsageFilter()
            assert strip(stream[:cut], False) + strip(stream[cut:], True) == expected

    def test_complete_events_go_out_at_once(self):
        """Only an unfinished event is held back; the rest leaves with the chunk that ended it."""
        strip = UsageFilter()

        assert strip(b"data: a\n\ndata: b", False) == b"data: a\n\n"
        assert strip(b"\n\n", False) == b"data: b\n\n"
        assert strip(b"data: tail", True) == b"data: tail"

    def test_after_the_usage_event_bytes_pass_untouched(self):
        """Once the usage event is gone, later chunks are not even split into events."""
        strip = UsageFilter()

        assert strip(USAGE_EVENT, False) == b""
        assert strip(b"data: [DONE]", False) == b"data: [DONE]"

    def test_a_usage_field_in_a_content_chunk_is_kept(self):
        """vLLM's continuous usage puts usage beside choices: that is not the extra chunk."""
        event = b'data: {"choices": [{"delta": {}}], "usage": {"prompt_tokens": 1}}\n\n'

        assert UsageFilter()(event, True) == event

    def test_a_stream_without_blank_lines_is_not_held_forever(self):
        """Past 1 MiB without an event boundary, the filter gives up and relays everything."""
        strip = UsageFilter()
        blob = b"x" * (1024 * 1024)

        assert strip(blob, False) == b""
        assert strip(b"yy", False) == blob + b"yy"
        assert strip(USAGE_EVENT, True) == USAGE_EVENT

    @pytest.mark.parametrize(
        ("status", "content_type", "length", "rewritten", "wanted"),
        [
            (200, "text/event-stream; charset=utf-8", None, True, True),
            (200, "text/event-stream", None, False, False),
            (200, "application/json", None, True, False),
            (200, "text/event-stream", 120, True, False),
            (400, "text/event-stream", None, True, False),
        ],
    )
    def test_filter_only_for_a_rewritten_request_answered_with_a_stream(
        self, status: int, content_type: str, length: int | None, rewritten: bool, wanted: bool
    ):
        """Errors, JSON replies and streams with a Content-Length pass unfiltered."""
        found = usage_filter(status, {"Content-Type": content_type}, length, rewritten)

        assert (found is not None) == wanted
