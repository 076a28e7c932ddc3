"""The exchange's header view: whatever path a lookup takes (what scan() noted, or a scan of the raw
list), it answers as a case-insensitive mapping that keeps the first of repeated headers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.proxy.headers import HeaderView, scan

NAMES = [
    "Content-Type",
    "content-encoding",
    "Inference-Header-Content-Length",
    "X-Request-ID",
    "Server",
    "Connection",
    "Content-Length",
]
CASINGS = st.sampled_from(NAMES).flatmap(
    lambda name: st.sampled_from([name, name.lower(), name.upper()])
)
HEADERS = st.lists(
    st.tuples(CASINGS.map(str.encode), st.binary(min_size=1, max_size=8)), max_size=10
)


def expected(raw: list[tuple[bytes, bytes]], name: str) -> str | None:
    for field, value in raw:
        if field.lower() == name.lower().encode():
            return value.decode("latin-1")
    return None


@given(raw=HEADERS, asked=CASINGS)
def test_every_lookup_agrees_with_the_first_raw_header(raw, asked):
    _, noted = scan(raw)
    for view in (HeaderView(raw), HeaderView(raw, noted)):
        want = expected(raw, asked)
        assert view.get(asked) == want
        assert (asked in view) is (want is not None)
        assert view.get(asked, "absent") == (want if want is not None else "absent")
        if want is not None:
            assert view[asked] == want


def test_a_name_outside_latin_1_is_absent():
    view = HeaderView([(b"Content-Type", b"application/json")], {})
    assert view.get("content-type\u0394") is None
    assert "content-type\u0394" not in view


def test_iteration_lists_lower_cased_names_once():
    raw = [(b"Content-Type", b"a"), (b"content-type", b"b"), (b"Server", b"c")]
    assert dict(HeaderView(raw, scan(raw)[1])) == {"content-type": "a", "server": "c"}
