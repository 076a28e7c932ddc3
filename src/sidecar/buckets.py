"""Histogram bucket bounds: the defaults of every histogram the sidecar exports, the `buckets`
setting that overrides them per metric, and regression-output bounds fitted to a profile.

A settings module: it imports nothing of ours, so that the config can check the setting and the
recorders take their bounds from here (docs/configuration.md, `buckets`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Final

__all__ = ["DEFAULT_BUCKETS", "check_buckets", "resolve", "value_buckets"]

_LATENCY: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_OVERHEAD: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip
_SIZES: Final = tuple(float(4**k * 64) for k in range(11))  # 64 B ... 64 MiB
_TIME_TO_FIRST_TOKEN: Final = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 60.0,
)  # fmt: skip
_TOKEN_GAPS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
# 1-2-5 steps from one token (or character) to half a million.
_LENGTHS: Final = tuple(float(m * 10**e) for e in range(7) for m in (1, 2, 5))[:-2]
# Regression outputs without a profile: zero and every decade from 0.01 to 10 million, both
# signs, so that a price or a count reads as well as a probability (at the cost of a bucket
# per decade: 21 bounds).
_DECADES: Final = tuple(sorted({0.0, *(s * 10.0**k for k in range(-2, 8) for s in (-1, 1))}))

DEFAULT_BUCKETS: Final[Mapping[str, tuple[float, ...]]] = {
    "ml_request_duration_seconds": _LATENCY,
    "ml_upstream_duration_seconds": _LATENCY,
    "sidecar_overhead_seconds": _OVERHEAD,
    "ml_request_size_bytes": _SIZES,
    "ml_response_size_bytes": _SIZES,
    "ml_prediction_confidence": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
    "ml_prediction_value": _DECADES,
    "ml_batch_size": tuple(float(2**k) for k in range(17)),  # 1 ... 65,536 rows
    "ml_time_to_first_token_seconds": _TIME_TO_FIRST_TOKEN,
    "ml_time_per_output_token_seconds": _TOKEN_GAPS,
    "ml_prompt_length_chars": _LENGTHS,
    "ml_prompt_length_tokens": _LENGTHS,
    "ml_completion_length_chars": _LENGTHS,
    "ml_completion_length_tokens": _LENGTHS,
}
MAX_BOUNDS: Final = 64  # each bound is a series per label set
# Bounds fitted to a profile: at most this many of its equal-mass edges, so that each bucket
# holds a similar share of the reference's outputs.
_FITTED_BOUNDS: Final = 12


def check_buckets(buckets: Mapping[str, Sequence[float]]) -> None:
    """ValueError naming the metric and what is wrong, for a `buckets` setting."""
    for name, bounds in buckets.items():
        if name not in DEFAULT_BUCKETS:
            msg = (
                f"buckets: {name!r} is not a histogram of the sidecar; "
                f"expected one of {', '.join(sorted(DEFAULT_BUCKETS))}"
            )
            raise ValueError(msg)
        if not 1 <= len(bounds) <= MAX_BOUNDS:
            msg = f"buckets.{name} has {len(bounds)} bounds; expected 1 to {MAX_BOUNDS}"
            raise ValueError(msg)
        if not all(math.isfinite(bound) for bound in bounds):
            msg = f"buckets.{name} {list(bounds)} must be finite numbers (+Inf is always added)"
            raise ValueError(msg)
        if any(later <= earlier for earlier, later in itertools.pairwise(bounds)):
            msg = f"buckets.{name} {list(bounds)} must increase strictly"
            raise ValueError(msg)


def value_buckets(edges: Sequence[float]) -> tuple[float, ...] | None:
    """Bounds for regression outputs from a profile's equal-mass edges of its outputs (min ..
    max), thinned to a dozen; None when the profile has too few to fit any."""
    distinct = sorted(set(edges))
    if len(distinct) < 2:
        return None
    step = max(1, math.ceil((len(distinct) - 1) / (_FITTED_BOUNDS - 1)))
    chosen = distinct[::step]
    if chosen[-1] != distinct[-1]:
        chosen.append(distinct[-1])
    return tuple(float(bound) for bound in chosen)


def resolve(
    configured: Mapping[str, Sequence[float]], profile_value_edges: Sequence[float] = ()
) -> dict[str, tuple[float, ...]]:
    """Every histogram's bounds: the setting's, else (regression outputs) the profile's, else
    the default."""
    found = dict(DEFAULT_BUCKETS)
    fitted = value_buckets(profile_value_edges)
    if fitted is not None:
        found["ml_prediction_value"] = fitted
    found.update({name: tuple(bounds) for name, bounds in configured.items()})
    return found
