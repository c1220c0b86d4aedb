"""The SVD engine: spectra, truncated factorisations, metrics, power-law fits, whitening maths."""

from rankwise.engine.metrics import (
    break_even_rank,
    condition_number,
    effective_rank,
    energy_rank,
    l12_norm,
    nuclear_norm,
    stable_rank,
)
from rankwise.engine.powerlaw import PowerLawFit, fit_power_law
from rankwise.engine.svd import singular_values, spectra, truncated_svd
from rankwise.engine.whitening import cholesky_factor, inverse_sqrt_factor

__all__ = [
    "PowerLawFit",
    "break_even_rank",
    "cholesky_factor",
    "condition_number",
    "effective_rank",
    "energy_rank",
    "fit_power_law",
    "inverse_sqrt_factor",
    "l12_norm",
    "nuclear_norm",
    "singular_values",
    "spectra",
    "stable_rank",
    "truncated_svd",
]
