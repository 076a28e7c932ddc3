"""No-drift noise floors: for a window of n rows against a reference of m rows, a score that a
window drawn from the reference's own population exceeds with probability at most `level`.

The recorder asks at a level already corrected for every test it makes (sidecar.drift.verdict),
so these are far tails (1e-4 and below), where asymptotic quantiles mislead. Each floor is a
bound or an exact computation, not a fitted quantile:

- KS (from the PIT): Massart's form of the Dvoretzky-Kiefer-Wolfowitz inequality,
  P(sqrt(n) D > t) <= 2 exp(-2 t^2), with n replaced by nm/(n+m) for the reference's own noise.
  The PIT grid only reads D at 101 points, below the exact D, so the bound holds for it too.
- Wasserstein (in reference standard deviations): sqrt(n) W tends to the integral of |B(F(x))| dx
  for a Brownian bridge B, a Gaussian supremum whose mean is sqrt(2/pi) times the integral of
  sqrt(F(1 - F)) dx and whose largest variance is the reference variance (Hoeffding's covariance
  identity); the Borell-TIS inequality then bounds its tail by exp(-t^2 / 2 sigma^2).
- PSI (1e-4 floor and all): its exact distribution, by convolution, under a Poissonised
  two-sample null. A bin the reference saw r times holds a count that is negative binomial: Poisson
  given the population's share, which the reference knows up to a Gamma(r + 1/2) (Jeffreys). So a
  bin with no reference mass still gets the ~n/(2m) values that a window shares with the
  reference's own extremes, and an empty window bin costs what it costs. Each bin's term is
  rounded up to the grid, so the floor errs high, by at most the grid step times the bin count.

numpy and the standard library only: the serving process computes these.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from sidecar.drift.sketches import CDF_LEVELS, EPS, Float

__all__ = ["PsiFloors", "ks_floor", "wasserstein_floor", "wasserstein_spread"]

GRID = 2047  # cells over [0, range) for the PSI distribution, plus one overflow cell: 2^11 in all
_TAIL_SDS = 12.0  # per-bin counts are enumerated this many standard deviations past their mean


def ks_floor(n: int, m: int, level: float) -> float:
    """KS distance (PIT grid) that n rows from the reference's population exceed with
    probability at most `level`."""
    return math.sqrt(math.log(2.0 / level) / 2.0) * math.sqrt(1.0 / n + 1.0 / m)


def wasserstein_spread(quantiles: Float, scale: float) -> float:
    """E of the limit of sqrt(n) W, in reference standard deviations: sqrt(2/pi) times the
    integral of sqrt(u (1 - u)) dQ(u), with `quantiles` the reference's x at CDF_LEVELS."""
    middle = (CDF_LEVELS[:-1] + CDF_LEVELS[1:]) / 2.0
    area = float(np.sum(np.diff(quantiles) * np.sqrt(middle * (1.0 - middle))))
    return math.sqrt(2.0 / math.pi) * area / scale


def wasserstein_floor(n: int, m: int, level: float, spread: float) -> float:
    """Wasserstein distance (reference standard deviations) that n rows from the reference's
    population exceed with probability at most `level` (asymptotically); `spread` from
    `wasserstein_spread`."""
    return (spread + math.sqrt(2.0 * math.log(1.0 / level))) * math.sqrt(1.0 / n + 1.0 / m)


class PsiFloors:
    """PSI floors of one feature's bins, computed exactly per window size and remembered.

    Window sizes are rounded down to 1/8 of an octave (exact below 64 rows): the floor falls as n
    grows, so a smaller n errs high, by under 9% at most, and a window that grows or slides asks
    for a few dozen sizes in all.
    """

    def __init__(self, reference: Float, rows: int) -> None:
        self._reference_counts = reference * rows
        self._reference = reference
        self._rows = rows
        self._known: dict[tuple[int, float], float] = {}

    def floor(self, n: int, level: float) -> float:
        key = (_grid_size(n), level)
        found = self._known.get(key)
        if found is None:
            found = self._known[key] = psi_quantile(
                self._reference, self._reference_counts, self._rows, key[0], level
            )
        return found


def _grid_size(n: int) -> int:
    if n <= 64:
        return max(n, 1)
    return int(2.0 ** (math.floor(8.0 * math.log2(n)) / 8.0))


def psi_quantile(q: Float, counts: Float, m: int, n: int, level: float) -> float:
    """The smallest t with P(PSI > t) <= level for n window rows against shares q of m rows
    (`counts` = q m), under the negative binomial null of the module docstring."""
    pmf = _window_counts(counts, m, n)
    terms = _psi_terms(np.arange(pmf.shape[1]) / n, q)
    mean = float(np.sum(pmf * terms))
    sd = math.sqrt(max(float(np.sum(pmf * terms**2)) - float(np.sum((pmf * terms).sum(1) ** 2)), 0))
    # Room for the bulk, and for the cost of every bin that may be empty by chance at this level.
    empty = float(np.sum(terms[:, 0], where=pmf[:, 0] > level / 100.0))
    width = mean + 8.0 * sd + empty
    for _ in range(60):
        floor = _quantile_on_grid(pmf, terms, width, level)
        if floor is None:  # more than `level` beyond the grid: widen it
            width *= 2.0
        elif floor < width / 4.0:  # found, but on a coarse grid: again, tighter, for precision
            width = floor * 1.25 + width / GRID
            refined = _quantile_on_grid(pmf, terms, width, level)
            return floor if refined is None else refined
        else:
            return floor
    msg = f"no PSI floor found for n={n}, level={level}"
    raise ArithmeticError(msg)


def _window_counts(counts: Float, m: int, n: int) -> NDArray[np.float64]:
    """(bins x c) probabilities of c window rows per bin: negative binomial with shape r + 1/2
    and success probability m/(m+n), enumerated far past the mean (`_convolve_all` counts what
    is left as beyond the grid)."""
    shape = counts + 0.5
    p = m / (m + n)
    mean = shape * (1.0 - p) / p
    top = int(np.max(mean + _TAIL_SDS * np.sqrt(mean / p))) + 40
    c = np.arange(top, dtype=np.float64)
    # log pmf(c) = k ln p + sum_{j<c} ln((j + k) / (j + 1)) + c ln(1 - p)
    steps = np.log(c[np.newaxis, :-1] + shape[:, np.newaxis]) - np.log(c[:-1] + 1.0)
    log_pmf = np.zeros((shape.size, top))
    log_pmf[:, 1:] = np.cumsum(steps, axis=1)
    log_pmf += shape[:, np.newaxis] * math.log(p) + c * math.log1p(-p)
    return np.exp(log_pmf)


def _psi_terms(p: Float, q: Float) -> NDArray[np.float64]:
    """(bins x c) PSI terms (p - q) ln(p / q), both floored at EPS in the log, as sketches.psi."""
    shares = p[np.newaxis, :]
    reference = q[:, np.newaxis]
    ratio = np.maximum(shares, EPS) / np.maximum(reference, EPS)
    return np.asarray((shares - reference) * np.log(ratio), dtype=np.float64)


def _quantile_on_grid(
    pmf: NDArray[np.float64], terms: NDArray[np.float64], width: float, level: float
) -> float | None:
    """The quantile with every term rounded up to a grid of GRID cells over [0, width); None if
    more than `level` lies beyond the grid."""
    step = width / GRID
    cells = np.minimum(np.ceil(terms / step - 1e-9), GRID).astype(np.intp)  # GRID: beyond
    total = _convolve_all(pmf, cells)
    survival = 1.0 - np.cumsum(total)  # P(sum > cell i)
    if total[GRID] > level:
        return None
    first = int(np.argmax(survival <= level))
    return first * step


def _convolve_all(pmf: NDArray[np.float64], cells: NDArray[np.intp]) -> Float:
    """Distribution of the sum over bins, on the grid, the last cell holding everything beyond."""
    size = GRID + 1
    bins = pmf.shape[0]
    flat = (np.arange(bins)[:, np.newaxis] * size + cells).ravel()
    per_bin = np.bincount(flat, weights=pmf.ravel(), minlength=bins * size).reshape(bins, size)
    per_bin[:, -1] += np.maximum(1.0 - pmf.sum(axis=1), 0.0)  # counts past the enumeration
    fft_size = 2 * size  # a power of two, and room for the sum of two such arrays
    spectra = np.fft.rfft(per_bin, fft_size, axis=1)
    total: Float = per_bin[0]
    for spectrum in spectra[1:]:
        full = np.fft.irfft(np.fft.rfft(total, fft_size) * spectrum, fft_size)
        total = np.clip(full[:size], 0.0, None)
        total[-1] += max(float(full[size:].sum()), 0.0)
    return total
