"""The prometheus_client internals sidecar relies on, checked against the installed version.

prometheus_client has no public API for two things sidecar does: adding a batch of observations
to a histogram at once (src/sidecar/recorders/batch.py) and reading how a Gauge was declared to
merge across processes (its multiprocess_mode, which src/sidecar/workers/snapshots.py turns into
the merge policy of --workers). pyproject.toml pins prometheus-client to the releases these
tests passed with. Before raising the pin, run them against the new release: each failure names
the internal that changed and the module to adapt.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram

from sidecar.workers.snapshots import MODE_POLICY

BATCH = "src/sidecar/recorders/batch.py"
SNAPSHOTS = "src/sidecar/workers/snapshots.py"

BOUNDS = (0.5, 1.0, 2.0)
# Both at a bound and between bounds, so that "a value falls in the first bucket whose bound is
# >= it" is checked at the edge; every value a multiple of 1/4, so sums are exact in any order.
VALUES = [0.25, 0.5, 0.75, 1.0, 1.0, 2.0, 2.5, 7.0]


@contextlib.contextmanager
def relied_on(internal: str, where: str) -> Iterator[None]:
    """Any failure inside means `internal` of prometheus_client changed: say so, and where."""
    try:
        yield
    except Exception as exc:
        pytest.fail(
            f"prometheus_client changed an internal sidecar relies on ({internal}): see {where}\n"
            f"{type(exc).__name__}: {exc}"
        )


def histogram_child() -> Histogram:
    metric = Histogram("h", "H.", ["route"], buckets=BOUNDS, registry=CollectorRegistry())
    return metric.labels("r")


# --- recorders/batch.py: a Histogram child's bounds, buckets and sum -----------------------------


def test_histogram_child_has_bounds_then_inf_and_one_bucket_value_per_bound() -> None:
    """`_upper_bounds` is the buckets asked for and +Inf; `_buckets` holds one value per bound,
    and each value, like `_sum`, takes inc() and get()."""
    child = histogram_child()
    with relied_on("Histogram._upper_bounds, ._buckets and ._sum", BATCH):
        assert list(child._upper_bounds) == [*BOUNDS, math.inf]
        assert len(child._buckets) == len(child._upper_bounds)
        for value in [child._sum, *child._buckets]:
            assert callable(value.inc)
            assert callable(value.get)


def test_histogram_bucket_values_count_only_their_own_bucket() -> None:
    """observe() adds 1 to the first bucket whose bound is >= the value (and to no other), and
    the value to `_sum`; collect() accumulates the buckets, so a bucket value's inc() shows in
    every cumulative bucket from its bound up."""
    child = histogram_child()
    with relied_on("Histogram._buckets hold per-bucket counts that collect() accumulates", BATCH):
        for value in VALUES:
            child.observe(value)
        assert [bucket.get() for bucket in child._buckets] == [2, 3, 1, 2]
        assert child._sum.get() == sum(VALUES)
        child._buckets[1].inc(4)
        child._sum.inc(4.0)
        found = {
            sample.labels.get("le", sample.name): sample.value
            for metric in child.collect()
            for sample in metric.samples
        }
        assert [found[le] for le in ("0.5", "1.0", "2.0", "+Inf")] == [2, 9, 10, 12]
        assert found["h_count"] == 12
        assert found["h_sum"] == sum(VALUES) + 4.0


def test_a_bucket_values_exemplar_is_the_one_collect_shows() -> None:
    """set_exemplars() gives a bucket value an Exemplar with set_exemplar(), as observe() does
    with an exemplar; collect() shows it on that bucket's sample."""
    from prometheus_client.samples import Exemplar

    child = histogram_child()
    with relied_on("Histogram._buckets[i].set_exemplar(Exemplar)", BATCH):
        child._buckets[1].inc(1)
        child._buckets[1].set_exemplar(Exemplar({"trace_id": "abc"}, 0.7, 1.0))
        exemplars = {
            sample.labels["le"]: sample.exemplar
            for metric in child.collect()
            for sample in metric.samples
            if sample.name.endswith("_bucket")
        }
        assert exemplars["1.0"] == Exemplar({"trace_id": "abc"}, 0.7, 1.0)
        assert exemplars["0.5"] is None


# --- workers/snapshots.py: a Gauge's multiprocess_mode -------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODE_POLICY))
def test_a_gauge_keeps_the_multiprocess_mode_it_was_declared_with(mode: str) -> None:
    """SnapshotRegistry reads `_multiprocess_mode` off each Gauge registered, and names the
    policy after the families describe() yields: the names collect() exports."""
    with relied_on("Gauge._multiprocess_mode; Gauge.describe() names", SNAPSHOTS):
        declared: Any = mode  # one of the Literal modes Gauge is typed with
        gauge = Gauge("g_seconds", "A gauge.", ["a"], multiprocess_mode=declared, registry=None)
        gauge.labels("x").set(1)
        assert gauge._multiprocess_mode == mode
        assert [m.name for m in gauge.describe()] == [m.name for m in gauge.collect()]
