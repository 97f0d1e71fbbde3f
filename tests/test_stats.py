"""trd_jax.stats: two-level (seeds x problems) bootstrap intervals, checked against exact enumerations."""

import numpy as np
import pytest

from trd_jax.stats import bootstrap_ci, bootstrap_means, difference_ci


def test_one_seed_two_problems_matches_the_enumeration():
    # S=1, P=2: the problem resamples (0,0), (0,1), (1,0), (1,1) are equally likely, so the grand mean is
    # 0.2, 0.4 or 0.6 with probabilities 1/4, 1/2, 1/4.
    values = [[0.2, 0.6]]
    means = bootstrap_means(values, resamples=40000, seed=1)
    for value, p in ((0.2, 0.25), (0.4, 0.5), (0.6, 0.25)):
        assert abs(np.mean(np.isclose(means, value)) - p) < 0.01
    # Percentiles of the enumerated distribution: 2.5% and 97.5% fall in the 0.2 and 0.6 atoms, 30% and
    # 70% in the 0.4 atom.
    assert bootstrap_ci(values, resamples=40000) == pytest.approx((0.4, 0.2, 0.2, 0.6))
    assert bootstrap_ci(values, level=0.4, resamples=40000) == pytest.approx((0.4, 0.0, 0.4, 0.4))


def test_seeds_are_resampled_too():
    # S=2, P=1: now the seeds carry the variation: 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4.
    means = bootstrap_means([[0.0], [1.0]], resamples=40000, seed=2)
    for value, p in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert abs(np.mean(np.isclose(means, value)) - p) < 0.01
    assert bootstrap_ci([[0.0], [1.0]], resamples=40000)[2:] == pytest.approx((0.0, 1.0))


def test_all_equal_values_have_zero_width():
    mean, half, low, high = bootstrap_ci(np.full((3, 5), 0.7))
    assert (mean, half, low, high) == pytest.approx((0.7, 0.0, 0.7, 0.7))


def test_mean_is_numpys_and_the_seed_fixes_the_interval():
    values = np.random.default_rng(0).random((4, 30))
    mean, half, low, high = bootstrap_ci(values, resamples=500, seed=3)
    assert mean == pytest.approx(values.mean()) and low < mean < high and half == pytest.approx((high - low) / 2)
    assert bootstrap_ci(values, resamples=500, seed=3) == (mean, half, low, high)
    assert bootstrap_ci(values, resamples=500, seed=4) != (mean, half, low, high)
    assert difference_ci(values, values[::-1], resamples=500, seed=5) == difference_ci(
        values, values[::-1], resamples=500, seed=5)


def test_difference_is_paired_over_problems():
    b = np.random.default_rng(1).random((3, 40))
    # The same seeds shifted by 0.1: every resample shares the problems, so the difference is exactly 0.1.
    diff, low, high, significant = difference_ci(np.tile(b[:1], (3, 1)) + 0.1, np.tile(b[:1], (2, 1)))
    assert (diff, low, high, significant) == (pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.1), True)
    diff, low, high, significant = difference_ci(b, b)
    assert diff == 0.0 and low < 0 < high and not significant
    with pytest.raises(ValueError, match="same problems"):
        difference_ci(b, b[:, :10])
    with pytest.raises(ValueError, match=r"f\[S, P\]"):
        bootstrap_ci([0.5, 0.5])
