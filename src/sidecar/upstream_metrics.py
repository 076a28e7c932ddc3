"""One scrape for the pod: the model server's own metrics, fetched on each scrape of the admin
port's /metrics and exposed after the sidecar's, unchanged (names, labels, values).

The fetch is bounded (`upstream_metrics_timeout`, MAX_EXPOSITION_BYTES) and never fails the
scrape: a model server that is down or slow, or answers what is not an exposition, costs its
families only, and `sidecar_upstream_metrics_up` says 0. A family whose name (or one of whose
samples' names) is one of ours is dropped, not merged: two families of one name would make the
whole scrape invalid. `sidecar_upstream_metrics_clashes` names the dropped ones, and a
rate-limited log line says so. A Python model server's `process_*` and `python_info` families
are such: the sidecar's are exposed, the model server's dropped.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.config import Config
from sidecar.logs import RateLimitedLog
from sidecar.proxy.pool import UpstreamPool, UpstreamResponse
from sidecar.proxy.upstream import UpstreamError

log = logging.getLogger(__name__)

# A large model server exposes a few hundred KB; the parser reads about 3 MB a second.
MAX_EXPOSITION_BYTES = 4 * 1024 * 1024
MAX_CLASHES = 50  # family names reported by name; further ones count under "__other__"
OTHER = "__other__"
UP = "sidecar_upstream_metrics_up"
DURATION = "sidecar_upstream_metrics_scrape_duration_seconds"
CLASHES = "sidecar_upstream_metrics_clashes"
_HEADERS = [
    (b"User-Agent", f"sidecar/{__version__} upstream-metrics".encode()),
    # The text format, which prometheus_client's parser reads; no compression to undo.
    (b"Accept", b"text/plain;version=0.0.4"),
    (b"Accept-Encoding", b"identity"),
]


class FetchError(Exception):
    """The upstream answered, but not an exposition we take."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """One fetch of the upstream's exposition: its families, or why there are none."""

    families: list[Metric] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


def upstream_metrics_of(config: Config) -> UpstreamMetrics | None:
    """What the admin port's /metrics adds to ours, if `upstream_metrics` is set."""
    if config.upstream_metrics is None:
        return None
    return UpstreamMetrics(config.upstream_metrics, config.upstream_metrics_timeout)


class UpstreamMetrics:
    """Fetches `url` on each scrape and joins its families to ours (`scrape`)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self._timeout = timeout
        target = urlsplit(url)
        self._tls = target.scheme == "https"
        self._host = target.hostname or "127.0.0.1"
        self._port = target.port or (443 if self._tls else 80)
        self._target = (
            (target.path or "/") + (f"?{target.query}" if target.query else "")
        ).encode()
        self._complaints = RateLimitedLog(log)

    async def scrape(self, ours: Collector) -> Collector:
        """Our families, then the report on this fetch, then the upstream's that do not clash:
        what the encoder of /metrics writes."""
        fetched = await self.fetch()
        own = list(ours.collect())
        taken = _names(own) | {UP, DURATION, CLASHES}
        kept: list[Metric] = []
        clashing: list[str] = []
        for family in fetched.families:
            if _names([family]) & taken:
                clashing.append(family.name)
            else:
                kept.append(family)
        if fetched.error is not None:
            self._complaints.warning(
                "fetch", "upstream metrics not fetched", url=self.url, error=fetched.error
            )
        if clashing:
            self._complaints.warning(
                "clash",
                "upstream metric families share a name with the sidecar's: dropped",
                url=self.url,
                families=clashing[:MAX_CLASHES],
            )
        return Families([*own, *_report(fetched, clashing), *kept])

    async def fetch(self) -> Fetched:
        """The upstream's families, parsed; or the error, within the timeout."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                text = await self._get()
                # The parser is pure Python: a few hundred KB take tens of ms, which the proxy's
                # requests on this event loop should not wait for.
                families = await asyncio.to_thread(_parse, text)
        except (UpstreamError, TimeoutError, FetchError, ValueError) as exc:  # parser: ValueError
            error = f"{type(exc).__name__} {exc}".strip()
            return Fetched(error=error, seconds=time.perf_counter() - started)
        return Fetched(families, seconds=time.perf_counter() - started)

    async def _get(self) -> str:
        # A pool for one request, closed after it: a connection per scrape (every 15 s or so)
        # costs nothing, and nothing is left open to close when the sidecar stops. The pool, not
        # a blocking http.client in a thread, so that a timeout really ends the fetch.
        pool = UpstreamPool(
            self._host,
            self._port,
            tls=self._tls,
            connect_timeout=self._timeout,
            read_timeout=self._timeout,
        )
        try:
            response = await pool.request("GET", self._target, _HEADERS, None)
            try:
                body = await _read_bounded(response)
            finally:
                response.release()
        finally:
            await pool.close()
        if response.status != 200:
            msg = f"{self.url} answered {response.status}"
            raise FetchError(msg)
        return body.decode("utf-8", errors="replace")


async def _read_bounded(response: UpstreamResponse) -> bytes:
    parts, size = [], 0
    while chunk := await response.read():
        size += len(chunk)
        if size > MAX_EXPOSITION_BYTES:
            msg = f"the exposition is over {MAX_EXPOSITION_BYTES} bytes"
            raise FetchError(msg)
        parts.append(chunk)
    return b"".join(parts)


_COUNTER = re.compile(r"^#[ \t]*TYPE[ \t]+(\S+)[ \t]+counter[ \t]*$", re.MULTILINE)


def _parse(text: str) -> list[Metric]:
    """The families of a text exposition, their samples named as the upstream named them.

    prometheus_client's parser names the samples of a counter declared without `_total`
    (Triton's `nv_inference_request_success`) with it, as OpenMetrics would; and no encoder
    keeps a counter's samples without it. So such a family goes out untyped, the one type under
    which both formats keep its samples' names: dashboards and alerts select by name.
    """
    bare = {name for name in _COUNTER.findall(text) if not name.endswith("_total")}
    return [
        _as_named(family) if family.type == "counter" and family.name in bare else family
        for family in text_string_to_metric_families(text)
    ]


def _as_named(counter: Metric) -> Metric:
    untyped = Metric(counter.name, counter.documentation, "untyped")
    untyped.samples = [
        sample._replace(name=sample.name.removesuffix("_total")) for sample in counter.samples
    ]
    return untyped


def _names(families: Iterable[Metric]) -> set[str]:
    """Every name the families take in an exposition: their own and their samples'."""
    return {
        name
        for family in families
        for name in (family.name, *(sample.name for sample in family.samples))
    }


def _report(fetched: Fetched, clashing: list[str]) -> list[Metric]:
    up = GaugeMetricFamily(
        UP,
        "1 if the upstream's metrics (upstream_metrics) were fetched and parsed for this scrape.",
        value=0 if fetched.error else 1,
    )
    duration = GaugeMetricFamily(
        DURATION,
        "Seconds the fetch of the upstream's metrics took for this scrape, parsing included.",
        value=fetched.seconds,
    )
    clashes = GaugeMetricFamily(
        CLASHES,
        "Upstream metric families dropped from this scrape because they share a name with the "
        f"sidecar's, by family (at most {MAX_CLASHES}; the rest under {OTHER}).",
        labels=["family"],
    )
    for name in clashing[:MAX_CLASHES]:
        clashes.add_metric([name], 1)
    if len(clashing) > MAX_CLASHES:
        clashes.add_metric([OTHER], len(clashing) - MAX_CLASHES)
    return [up, duration, clashes]


class Families(Collector):
    """Families already collected, as the encoders take them: a collector."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
