"""The SVD engine: spectra, truncated factorisations, metrics, power-law fits, whitening maths, devices.

Every dense decomposition of the package (LAPACK / cuSOLVER) lives in this package:
:mod:`~rankwise.engine.svd`, :mod:`~rankwise.engine.linalg`, :mod:`~rankwise.engine.whitening`,
:mod:`~rankwise.engine.subspace`. Names are imported on first access (PEP 562), so importing a
light module such as :mod:`rankwise.engine.device` (whose option checks config dataclasses use)
does not import torch.
"""

from __future__ import annotations

from rankwise._lazy import attach

# The engine's method names (torch-free, so config dataclasses and CLI choices take them from here).
SPECTRUM_METHODS = ("gram", "svd")  # batched_spectra: float64 Gram eigenvalues, or svdvals
SVD_METHODS = ("exact", "randomized")  # truncated_svd: LAPACK, or seeded torch.svd_lowrank

_LAZY: dict[str, str] = {
    "break_even_rank": "rankwise.engine.metrics",
    "condition_number": "rankwise.engine.metrics",
    "effective_rank": "rankwise.engine.metrics",
    "energy_rank": "rankwise.engine.metrics",
    "l12_norm": "rankwise.engine.metrics",
    "nuclear_norm": "rankwise.engine.metrics",
    "stable_rank": "rankwise.engine.metrics",
    "PowerLawFit": "rankwise.engine.powerlaw",
    "fit_power_law": "rankwise.engine.powerlaw",
    "singular_values": "rankwise.engine.svd",
    "spectra": "rankwise.engine.svd",
    "thin_svd": "rankwise.engine.svd",
    "truncated_svd": "rankwise.engine.svd",
    "cholesky_factor": "rankwise.engine.whitening",
    "inverse_sqrt_factor": "rankwise.engine.whitening",
}

__all__ = sorted([*_LAZY, "SPECTRUM_METHODS", "SVD_METHODS"])

__getattr__, __dir__ = attach(__name__, _LAZY)
