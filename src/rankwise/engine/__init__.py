"""The SVD engine: spectra, truncated factorisations, metrics, power-law fits, whitening maths, devices.

Every dense decomposition of the package (LAPACK / cuSOLVER) lives in this package:
:mod:`~rankwise.engine.svd`, :mod:`~rankwise.engine.linalg`, :mod:`~rankwise.engine.whitening`,
:mod:`~rankwise.engine.subspace`. Names are imported on first access (PEP 562), so importing a
light module such as :mod:`rankwise.engine.device` (whose option checks config dataclasses use)
does not import torch.
"""

from __future__ import annotations

from rankwise._lazy import attach

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

__all__ = sorted(_LAZY)

__getattr__, __dir__ = attach(__name__, _LAZY)
