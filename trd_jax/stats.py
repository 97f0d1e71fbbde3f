"""Confidence intervals for accuracies measured over seeds and problems (numpy only).

Input is a matrix ``values: f[S, P]``: for each of S seeds (independent training runs) the accuracy on
each of P problems (correct samples / samples). Both seeds and problems are samples from larger
populations, so the bootstrap resamples both (a two-level bootstrap): S seeds with replacement, and P
problems with replacement, one problem resample shared by the chosen seeds (the runs were evaluated on
the same problems). The statistic is the grand mean; the interval is the percentile interval of its
bootstrap distribution.

Resampling with replacement is drawn as multinomial counts (how often each seed / problem is chosen),
the same distribution, so that a resampled grand mean is ``(c_s / S) @ values @ (c_p / P)`` with no
f[R, S, P] array in memory.
"""

from __future__ import annotations

import numpy as np


def _matrix(values, name: str) -> np.ndarray:
    a = np.asarray(values, np.float64)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty f[S, P] matrix (seeds x problems), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite values")
    return a


def _check(level: float, resamples: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: must be in (0, 1)")
    if int(resamples) < 1:
        raise ValueError(f"resamples={resamples}: must be >= 1")


def _weights(rng: np.random.Generator, size: int, resamples: int) -> np.ndarray:
    """f[R, size]: per resample, how often each item is drawn when drawing ``size`` with replacement, / size."""
    return rng.multinomial(size, np.full(size, 1.0 / size), size=resamples) / size


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_means(values, *, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """f[resamples]: the grand mean of ``values: f[S, P]`` under each two-level resample."""
    a = _matrix(values, "values")
    rng = np.random.default_rng(seed)
    w_seed = _weights(rng, a.shape[0], resamples)
    w_problem = _weights(rng, a.shape[1], resamples)
    return np.einsum("rs,sp,rp->r", w_seed, a, w_problem)


def bootstrap_ci(values, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
                 ) -> tuple[float, float, float, float]:
    """(mean, half_width, low, high) of the grand mean of ``values: f[S, P]`` (per-seed, per-problem
    accuracy): the mean of all values, and the percentile interval at ``level`` of the two-level
    bootstrap; half_width = (high - low) / 2. Deterministic for a given ``seed``."""
    _check(level, resamples)
    a = _matrix(values, "values")
    low, high = _interval(bootstrap_means(a, resamples=resamples, seed=seed), level)
    return float(a.mean()), (high - low) / 2, low, high


def difference_ci(a, b, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
                  ) -> tuple[float, float, float, bool]:
    """(difference, low, high, significant) for mean(a) - mean(b), two methods evaluated on the same P
    problems (``a: f[Sa, P]``, ``b: f[Sb, P]``): each resample draws the seeds of a and of b independently
    and one problem resample shared by both (a paired comparison over problems). ``significant``: the
    percentile interval at ``level`` excludes 0."""
    _check(level, resamples)
    a, b = _matrix(a, "a"), _matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must cover the same problems: {a.shape[1]} != {b.shape[1]} columns")
    rng = np.random.default_rng(seed)
    w_a, w_b = _weights(rng, a.shape[0], resamples), _weights(rng, b.shape[0], resamples)
    w_problem = _weights(rng, a.shape[1], resamples)
    stats = np.einsum("rs,sp,rp->r", w_a, a, w_problem) - np.einsum("rs,sp,rp->r", w_b, b, w_problem)
    low, high = _interval(stats, level)
    return float(a.mean() - b.mean()), low, high, bool(low > 0 or high < 0)
