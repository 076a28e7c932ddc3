"""The verdict on one feature: is its window different from the reference beyond chance, and by
how much.

Two questions, two answers:

- **Whether** is a test per statistic against its noise floor (drift/floors.py). A model runs many
  tests at each scrape (every feature, several statistics, a long and a short window), so each
  runs at noise_alpha divided by their number (Bonferroni): the chance that a window with no
  drift flags any feature of the model is then at most noise_alpha, whatever the window size.
- **How much** is a shift in reference standard deviations, the one scale graded on every feature
  type: for numbers the Wasserstein distance over the reference standard deviation (a shift by
  d standard deviations reads d on any distribution, so a smaller shift never outranks a larger
  one), for shares of rows (categories, missing, not a number) the shift of a normal feature
  that moves the same share of rows, 2 Phi^-1((1 + TV) / 2) for total variation TV.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from sidecar.drift.sketches import Float

__all__ = [
    "CATEGORICAL_TESTS",
    "NUMERIC_TESTS",
    "WINDOWS",
    "grade",
    "share_shift",
    "test_level",
]

NUMERIC_TESTS = ("psi", "ks", "wasserstein")
CATEGORICAL_TESTS = ("psi",)
WINDOWS = 2  # the window, and its most recent fifth (counts.RECENT_SLOTS of its slots)
_MOST_TV = 1.0 - 1e-12  # total variation 1 (disjoint) would be an infinite shift


def test_level(alpha: float, tests: int) -> float:
    """The level of each of `tests` tests that keeps the chance of any false alarm under alpha."""
    return alpha / max(tests, 1)


def share_shift(p: Float, q: Float) -> float:
    """Shares p against q as the shift (in standard deviations) of a normal feature that moves
    the same share of rows: 0.1 of the rows reads 0.25, 0.2 reads 0.5.

    >>> round(share_shift(np.array([0.9, 0.1]), np.array([1.0, 0.0])), 3)
    0.251
    """
    tv = min(float(np.sum(np.abs(p - q))) / 2.0, _MOST_TV)
    return 2.0 * NormalDist().inv_cdf((1.0 + tv) / 2.0)


def grade(shift: float, warning: float, critical: float) -> int:
    """1 (warning) or 2 (critical) for a significant drift of this size; 0 below warning."""
    if math.isnan(shift) or shift < warning:
        return 0
    return 2 if shift >= critical else 1
