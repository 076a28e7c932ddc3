"""Whole-batch updates of prometheus_client metrics: one numpy pass instead of one call per row.

`Histogram.observe()` walks its buckets and takes a lock for each value; a 10,000-row batch would
pay that 10,000 times. Here the bucket counts come from `np.searchsorted` + `np.bincount` and each
non-empty bucket is incremented once, through the child's own value objects.

prometheus_client has no public way to add many observations at once, so this module reaches
into its metric objects (the only other one, workers/snapshots.py, reads a gauge's mode). It
relies on a labelled Histogram child's `_upper_bounds` (the bucket bounds, ending with +Inf),
`_buckets` (one value per bound, each counting only its own bucket; `collect()` accumulates
them) and `_sum`, whose values take `inc(amount)`, and the buckets' `set_exemplar(exemplar)`.
tests/test_prometheus_internals.py checks each of these against the installed prometheus_client;
pyproject.toml pins the versions it passed with.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray
from prometheus_client import Histogram
from prometheus_client.samples import Exemplar


def observe_many(child: Histogram, values: NDArray[np.float64]) -> None:
    """Observe every non-NaN value of `values` in one labelled histogram child."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return
    bounds = np.asarray(child._upper_bounds)  # ends with +Inf, so every value has a bucket
    # A value v falls in the first bucket whose bound is >= v, as in Histogram.observe.
    counts = np.bincount(np.searchsorted(bounds, finite, side="left"), minlength=bounds.size)
    child._sum.inc(float(finite.sum()))
    for bucket, count in zip(child._buckets, counts.tolist(), strict=True):
        if count:
            bucket.inc(count)


def set_exemplars(child: Histogram, traced: Iterable[tuple[float, str]]) -> None:
    """Give the buckets that these (value, trace id) pairs fall in their exemplar, as
    `observe(value, {"trace_id": ...})` would (the last pair of a bucket wins). For values that
    observe_many has counted already; only traced exchanges come here."""
    bounds = child._upper_bounds
    now = time.time()
    for value, trace_id in traced:
        bucket = child._buckets[bisect.bisect_left(bounds, value)]
        bucket.set_exemplar(Exemplar({"trace_id": trace_id}, value, now))
