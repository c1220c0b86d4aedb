"""Heavy-tail exponent α of an eigenvalue spectrum (docs/methods.md §1).

Continuous power law p(λ) ∝ λ^(-α) for λ ≥ λ_min, fitted by maximum likelihood
(the Hill estimator α = 1 + n / Σ ln(λᵢ/λ_min)); λ_min is the candidate that
minimises the Kolmogorov–Smirnov distance between the empirical and fitted tail
CDFs (Clauset, Shalizi & Newman 2009).

The conventions follow WeightWatcher 0.7 (``WW_powerlaw.WWFit``, its default
fitter) so that α agrees with it:

* the eigenvalues are λᵢ = σᵢ² of W, not normalised by the matrix size;
* eigenvalues ≤ ``floor`` (1e-5, WeightWatcher's ``EVALS_THRESH``) are dropped;
* every eigenvalue except the largest is a λ_min candidate (tails of ≥ 2 points),
  and there is no upper cut-off (``xmax=None``) unless one is given;
* the KS distance is max_j |F_fit(x_j) − (j−i)/n| over the tail (the empirical
  CDF taken just below each point, as WeightWatcher does).

All candidate λ_min are evaluated at once with cumulative sums and a broadcast
(in chunks so memory stays bounded), so a fit of a few thousand eigenvalues
takes milliseconds where WeightWatcher's Python loop takes much longer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: eigenvalues at or below this are treated as zero (WeightWatcher's EVALS_THRESH)
EVALS_FLOOR = 1e-5


@dataclass(frozen=True)
class PowerLawFit:
    """Result of :func:`fit_power_law`: exponent, chosen λ_min, KS distance and tail size."""

    alpha: float
    xmin: float
    ks: float
    n_tail: int


_NAN_FIT = PowerLawFit(alpha=math.nan, xmin=math.nan, ks=math.nan, n_tail=0)


def fit_power_law(
    eigenvalues: np.ndarray | list[float],
    min_tail: int = 2,
    xmax: float | None = None,
    min_evals: int = 8,
    floor: float = EVALS_FLOOR,
    chunk_elems: int = 4_000_000,
) -> PowerLawFit:
    """Fit α to the tail of ``eigenvalues`` (λᵢ = σᵢ², any order).

    ``min_tail``: the smallest number of points a tail may have (2, as in
    WeightWatcher). ``min_evals``: fewer usable eigenvalues than this gives a
    NaN fit (WeightWatcher skips such layers). Values ≤ ``floor`` and non-finite
    values are dropped, values above ``xmax`` (if given) too. ``chunk_elems``
    bounds the size of the candidate × point KS matrix held at once.
    """
    x = np.asarray(eigenvalues, dtype=np.float64).ravel()
    x = x[np.isfinite(x) & (x > floor)]
    if xmax is not None:
        x = x[x <= xmax]
    x = np.sort(x)
    n = len(x)
    min_tail = max(2, int(min_tail))
    if n < max(min_tail, min_evals):
        return _NAN_FIT
    logx = np.log(x)
    # Candidate λ_min = x[i] for i in [0, n - min_tail]; tail = x[i:], size n - i.
    cand = np.arange(0, n - min_tail + 1)
    n_tail = (n - cand).astype(np.float64)
    suffix_log = np.cumsum(logx[::-1])[::-1]  # Σ_{j≥i} ln x_j
    denom = suffix_log[cand] - n_tail * logx[cand]
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = 1.0 + n_tail / denom
    ks = np.full(len(cand), np.inf)
    ok = np.isfinite(alpha) & (alpha > 1.0)
    rows = max(1, chunk_elems // n)
    j = np.arange(n)[None, :]
    for start in range(0, len(cand), rows):
        c = cand[start : start + rows]
        a = alpha[start : start + rows, None]
        i = c[:, None]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            theo = 1.0 - np.exp((logx[None, :] - logx[c][:, None]) * (1.0 - a))
            emp = (j - i) / n_tail[start : start + rows, None]
            dist = np.abs(theo - emp)
        dist = np.where(j >= i, dist, 0.0)
        ks[start : start + rows] = np.where(ok[start : start + rows], dist.max(axis=1), np.inf)
    if not np.isfinite(ks).any():
        return _NAN_FIT
    best = int(np.argmin(ks))
    return PowerLawFit(
        alpha=float(alpha[best]), xmin=float(x[cand[best]]), ks=float(ks[best]), n_tail=int(n_tail[best])
    )


def power_law_density(x: np.ndarray, fit: PowerLawFit) -> np.ndarray:
    """The fitted density p(λ) = (α−1)/λ_min · (λ/λ_min)^(−α), for plotting over the tail."""
    a, xm = fit.alpha, fit.xmin
    return (a - 1.0) / xm * (np.asarray(x, dtype=np.float64) / xm) ** (-a)
