"""The drift arithmetic in sidecar.drift.sketches, checked against textbook formulas and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats
from scipy.spatial.distance import jensenshannon

from sidecar.drift import sketches as sk


def cdf_of(reference: np.ndarray, points: int = 101) -> sk.Cdf:
    """The reference CDF the way the profile builder makes it: quantile knots, exact F."""
    ordered = np.sort(reference)
    knots = np.unique(np.quantile(ordered, np.linspace(0, 1, points)))
    below = np.searchsorted(ordered, knots, "left") / ordered.size
    at = np.searchsorted(ordered, knots, "right") / ordered.size
    return sk.make_cdf(knots, below, at)


class TestEdges:
    def test_continuous_reference_splits_into_equal_shares(self):
        """Twenty bins of a normal reference each hold about 5% of it."""
        x = np.random.default_rng(0).normal(size=50_000)
        edges = sk.equal_mass_edges(np.sort(x), x.min(), x.max())
        shares = np.bincount(
            sk.numeric_codes(x, np.zeros(x.size, bool), sk.search_points(edges)), minlength=24
        )
        assert edges.size == 21
        assert shares[1:21] / x.size == pytest.approx(np.full(20, 0.05), abs=0.002)
        assert shares[0] == shares[21] == 0

    def test_heavy_tie_gets_a_bin_of_its_own(self):
        """A zero-inflated feature: the zeros fill one bin exactly, the rest share the others."""
        rng = np.random.default_rng(1)
        x = np.where(rng.random(20_000) < 0.4, 0.0, rng.exponential(size=20_000))
        edges = sk.equal_mass_edges(np.sort(x), 0.0, x.max())
        codes = sk.numeric_codes(x, np.zeros(x.size, bool), sk.search_points(edges))
        assert np.all(codes[x == 0] == 1)
        assert np.all(codes[x > 0] > 1)
        assert edges.size - 1 <= sk.N_BINS

    def test_discrete_reference_gets_one_bin_per_value(self):
        """Four distinct values make four bins, cut half-way between neighbours."""
        values = np.array([0.0, 1.0, 2.0, 5.0])
        edges = sk.equal_mass_edges(values, 0.0, 5.0, discrete=values)
        assert edges.tolist() == [0.0, 0.5, 1.5, 3.5, 5.0]

    @pytest.mark.parametrize(
        ("name", "draw"),
        [
            ("poisson(30)", lambda rng: rng.poisson(30, 20_000).astype(float)),
            ("poisson(4)", lambda rng: rng.poisson(4, 20_000).astype(float)),
            ("rounded to 0.1", lambda rng: np.round(rng.normal(size=20_000), 1)),
            (
                "zero-inflated",
                lambda rng: np.where(rng.random(20_000) < 0.6, 0.0, rng.gamma(2, size=20_000)),
            ),
            ("two heavy values", lambda rng: rng.choice([0.0, 1.0, 2.5, 7.0], 20_000)),
        ],
    )
    def test_tied_values_stay_whole_within_the_cap_and_no_bin_is_empty(self, name, draw):
        """Integer and heavily tied features: every copy of a value in one bin, at most
        N_BINS bins, none without reference mass, and no bin with over twice a fair share
        unless it holds a single value."""
        x = np.sort(draw(np.random.default_rng(8)))
        edges = sk.equal_mass_edges(x, x[0], x[-1])
        codes = sk.numeric_codes(x, np.zeros(x.size, bool), sk.search_points(edges))
        bins = edges.size - 1
        shares = np.bincount(codes, minlength=bins + 4)[1 : bins + 1] / x.size
        values, first = np.unique(x, return_index=True)
        last = np.searchsorted(x, values, "right") - 1
        assert bins <= sk.N_BINS, name
        assert np.all(codes[first] == codes[last]), name  # no value split across two bins
        assert np.all(shares > 0), name
        crowded = shares > 2 / bins
        assert all(np.unique(x[codes == c + 1]).size == 1 for c in np.flatnonzero(crowded))


def test_numeric_codes_follow_the_bin_layout():
    """below, b00.., above, missing, nan: infinities are out of range, NaN and null are apart."""
    points = sk.search_points(np.array([0.0, 1.0, 2.0]))
    x = np.array([-np.inf, -1, 0, 0.5, 1, 2, 2.5, np.inf, np.nan, np.nan])
    missing = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 0], dtype=bool)
    assert sk.numeric_codes(x, missing, points).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5]
    assert sk.numeric_labels(2) == ["below", "b00", "b01", "above", "missing", "nan"]


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.integers(0, 300), elements=st.sampled_from([-9.0, -1, 0, 0.5, 1, 3, 7])),
    st.lists(st.sampled_from([-2.0, -1, 0, 0.25, 1, 2.5, 3, 8]), min_size=1, max_size=6),
)
def test_bin_counts_of_sorted_values_equal_a_bincount_of_codes(values, cuts):
    """The hot path's one-sort counting gives exactly the per-value codes' counts."""
    edges = np.unique(cuts)
    edges = np.concatenate((edges, edges[-1:])) if edges.size == 1 else edges
    points = sk.search_points(edges)
    codes = sk.numeric_codes(values, np.zeros(values.size, bool), points)
    expected = np.bincount(codes, minlength=points.size + 1)
    assert sk.bin_counts(np.sort(values), points).tolist() == expected.tolist()


@pytest.mark.parametrize("kind", ["continuous", "atoms"])
def test_pit_counts_equal_cells_of_the_per_value_pit(kind):
    """Cell counts from thresholds equal those of u = F_ref(x) value by value, atoms included."""
    rng = np.random.default_rng(2)
    reference = rng.normal(size=20_000)
    if kind == "atoms":
        reference = np.round(reference * 2) / 2  # nine or so repeated values
    cdf = cdf_of(reference)
    x = np.sort(np.concatenate((rng.normal(0.3, 1.2, 3000), rng.choice(reference, 2000))))
    by_value = np.bincount(sk.pit_cells(sk.pit(x, cdf, np.random.default_rng(7))), minlength=100)
    counted = sk.pit_counts(x, sk.make_pit_table(cdf), np.random.default_rng(7))
    assert cdf.atoms == (kind == "atoms")
    assert counted.tolist() == by_value.tolist()


def test_randomised_pit_is_uniform_for_a_discrete_reference():
    """Draws from a three-valued reference spread evenly over the PIT cells."""
    rng = np.random.default_rng(3)
    reference = rng.choice([0.0, 1.0, 2.0], p=[0.5, 0.3, 0.2], size=50_000)
    cdf = cdf_of(reference)
    x = np.sort(rng.choice([0.0, 1.0, 2.0], p=[0.5, 0.3, 0.2], size=50_000))
    cells = sk.pit_counts(x, sk.make_pit_table(cdf), rng)
    assert stats.chisquare(cells).pvalue > 0.001


def test_psi_js_linf_equal_the_textbook_formulas():
    """PSI = sum (p-q) ln(p/q), JS = scipy's Jensen-Shannon distance squared (base 2), L-inf."""
    rng = np.random.default_rng(4)
    p, q = rng.dirichlet(np.ones(24)), rng.dirichlet(np.ones(24))
    assert sk.psi(p, q) == pytest.approx(float(np.sum((p - q) * np.log(p / q))), rel=1e-12)
    assert sk.js(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2, rel=1e-9)
    assert sk.linf(p, q) == pytest.approx(float(np.max(np.abs(p - q))), rel=1e-12)


def test_psi_floors_empty_bins_at_eps():
    """An empty bin costs (p - q) ln(p / 1e-4) instead of infinity; JS stays finite without it."""
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.5, 0.0, 0.5])
    assert sk.psi(p, q) == pytest.approx(2 * 0.5 * np.log(0.5 / sk.EPS))
    assert sk.js(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2)


def test_ks_two_sample_equals_scipy():
    """The exact two-sample KS statistic is scipy's, ties included."""
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 30, 700).astype(float), rng.integers(2, 33, 400).astype(float)
    assert sk.ks_two_sample(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)


def test_ks_from_pit_counts_values_outside_the_range_at_the_ends():
    """A window wholly below the reference range is KS 1; half below, half uniform is 0.5."""
    cells = np.zeros(100, dtype=np.int64)
    cells[0] = 10
    assert sk.ks_from_pit(cells, below=10, above=0) == pytest.approx(1.0)
    cells = np.ones(100, dtype=np.int64)
    cells[0] += 100
    assert sk.ks_from_pit(cells, below=100, above=0) == pytest.approx(0.5)


def test_wasserstein_from_pit_adds_exact_tails():
    """Values 3 above the reference maximum add 3 x their share to the distance."""
    quantiles = sk.CDF_LEVELS  # uniform(0, 1) reference: x = u
    cells = np.full(100, 9, dtype=np.int64)
    cells[-1] += 100  # 100 values at x = 4, i.e. 3 above the maximum
    w = sk.wasserstein_from_pit(cells, 0, 100, (0.0, 300.0), quantiles)
    assert w == pytest.approx(
        stats.wasserstein_distance(
            np.concatenate((np.linspace(0.005, 0.995, 900), np.full(100, 4.0))),
            np.linspace(0, 1, 10_001),
        ),
        abs=0.01,
    )


def test_number_labels_write_integral_values_without_a_fraction():
    """3.0 reads "3" (as JSON 3 and CSV "3" do); other numbers keep their shortest form."""
    labels = sk.number_labels(np.array([3.0, -0.0, 2.5, 1e20, 0.1, np.nan]))
    assert labels.tolist() == ["3", "0", "2.5", "1e+20", "0.1", "nan"]


def test_categories_match_text_and_numbers():
    """Text cells match by value; numeric cells match reference values that are numbers."""
    cats = sk.categories(["red", "3", "2.5", "green"])
    text = np.array(["green", "blue", "red", None], dtype=object)
    assert sk.categorical_codes(text, cats).tolist() == [3, 4, 0, 4]
    assert sk.number_codes(np.array([3.0, 2.5, 4.0]), cats).tolist() == [1, 2, 4]
    assert sk.categorical_labels(["a", "unseen"]) == ["a", "value:unseen", "unseen", "missing"]
