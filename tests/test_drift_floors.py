"""The noise floors of sidecar.drift.floors against Monte-Carlo windows drawn with no drift: each
holds its level (a window exceeds it no more often than it says) without being far above the
true quantile (which would cost detection)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sidecar.drift import floors
from sidecar.drift import sketches as sk

REFERENCE_ROWS = 20_000


def numeric_shares() -> np.ndarray:
    """A numeric feature's layout: below, 20 equal-mass bins, above, missing, nan."""
    return np.concatenate(([0.0], np.full(20, 0.05), [0.0, 0.0, 0.0]))


def psi_of_windows(q: np.ndarray, n: int, windows: int, rng: np.random.Generator) -> np.ndarray:
    """PSI of `windows` windows of n rows from a population the reference of REFERENCE_ROWS
    rows was itself drawn from (the population's shares vary as the reference's sampling
    noise allows)."""
    population = rng.dirichlet(q * REFERENCE_ROWS + 0.5, size=windows // 500)
    p = np.concatenate([rng.multinomial(n, shares, size=500) for shares in population]) / n
    ratio = np.maximum(p, sk.EPS) / np.maximum(q, sk.EPS)
    return np.asarray(np.sum((p - q) * np.log(ratio), axis=1))


@pytest.mark.parametrize("n", [100, 200, 1000, 5000])
@pytest.mark.parametrize("level", [0.01, 0.001])
def test_psi_floor_holds_its_level_with_empty_bins_at_small_windows(n, level):
    """At 100 rows an empty bin costs 0.05 ln(0.05 / 1e-4) = 0.31 and happens in one window in
    nine; the floor counts it. Exceeded in at most `level` of 100,000 no-drift windows, and in
    at least a quarter of that (the floor is not a loose bound)."""
    q = numeric_shares()
    psi = psi_of_windows(q, n, 100_000, np.random.default_rng(n))
    floor = floors.psi_quantile(q, q * REFERENCE_ROWS, REFERENCE_ROWS, n, level)
    exceeded = np.mean(psi > floor)
    assert level / 4 < exceeded <= level


def test_psi_floor_of_a_categorical_feature_with_a_rare_value():
    """Shares 0.6 / 0.3 / 0.099 / 0.001 and empty unseen and missing bins, 200 rows: the floor
    holds at 0.01 though a window meets the rare value or an unseen one only now and then."""
    q = np.array([0.6, 0.3, 0.099, 0.001, 0.0, 0.0])
    psi = psi_of_windows(q, 200, 100_000, np.random.default_rng(9))
    floor = floors.psi_quantile(q, q * REFERENCE_ROWS, REFERENCE_ROWS, 200, 0.01)
    assert 0.0025 < np.mean(psi > floor) <= 0.01


def test_remembered_psi_floors_err_high_on_the_grid_of_sizes():
    """Sizes are rounded down to 1/8 octave: the floor for 1,090 rows is that for 1,024, above
    the exact one and within 9% of it."""
    q = numeric_shares()
    remembered = floors.PsiFloors(q, REFERENCE_ROWS).floor(1090, 0.001)
    exact = floors.psi_quantile(q, q * REFERENCE_ROWS, REFERENCE_ROWS, 1090, 0.001)
    assert exact < remembered < exact * 1.09


def pit_windows(n: int, windows: int, rng: np.random.Generator) -> np.ndarray:
    """PIT cell counts of no-drift windows: u uniform over 100 cells."""
    return rng.multinomial(n, np.full(sk.PIT_CELLS, 1.0 / sk.PIT_CELLS), size=windows)


@pytest.mark.parametrize("n", [100, 1000, 5000])
def test_ks_floor_holds_its_level(n):
    """Massart's bound: exceeded in at most 1% of 10,000 windows at level 0.01."""
    cells = pit_windows(n, 10_000, np.random.default_rng(n))
    ks = np.array([sk.ks_from_pit(c, 0, 0) for c in cells])
    assert np.mean(ks > floors.ks_floor(n, 10**9, 0.01)) <= 0.01


REFERENCES = {
    "normal": stats.norm(),
    "lognormal": stats.lognorm(1.0),
    "exponential": stats.expon(),
    "uniform": stats.uniform(),
}


@pytest.mark.parametrize("name", REFERENCES)
@pytest.mark.parametrize("n", [100, 1000])
def test_wasserstein_floor_holds_its_level(name, n):
    """Borell-TIS on the Brownian-bridge limit: windows of 100 and 1,000 rows from four shapes,
    long tails included, exceed the floor in at most 1% of 5,000 at level 0.01, and in more
    than none at level 0.5 (the bound is not vacuous)."""
    law = REFERENCES[name]
    quantiles = law.ppf(np.clip(sk.CDF_LEVELS, 1e-5, 1 - 1e-5))
    scale = float(law.std())
    spread = floors.wasserstein_spread(quantiles, scale)
    cells = pit_windows(n, 5_000, np.random.default_rng(n))
    w = np.array([sk.wasserstein_from_pit(c, 0, 0, (0.0, 0.0), quantiles) for c in cells]) / scale
    assert np.mean(w > floors.wasserstein_floor(n, 10**9, 0.01, spread)) <= 0.01
    assert np.mean(w > floors.wasserstein_floor(n, 10**9, 0.5, spread)) > 0.001


def test_wasserstein_spread_of_a_normal_reference():
    """sqrt(2/pi) times the integral of sqrt(Phi (1 - Phi)) dx, for N(0, 1), by quadrature, to
    1%, with the range a 20,000-row reference spans (the outermost knots, 5e-4 of the mass
    from each end, are far apart: the profile's own sum errs high there, never low)."""
    x = np.linspace(-4.3, 4.3, 200_001)
    cdf = stats.norm.cdf(x)
    expected = np.sqrt(2 / np.pi) * np.trapezoid(np.sqrt(cdf * (1 - cdf)), x)
    quantiles = stats.norm.ppf(np.clip(sk.CDF_LEVELS, 1e-5, 1 - 1e-5))
    spread = floors.wasserstein_spread(quantiles, 1.0)
    assert expected <= spread < expected * 1.01
