"""whiten (SVD-LLM): truncation-aware data whitening.

C = XᵀX = L Lᵀ (Cholesky in float64, jitter or eigen fallback through
:func:`rankwise.engine.whitening.cholesky_factor`, which warns naming the matrix).
SVD of W·L, truncate to k, B = U_k, A = diag(σ_k) V_kᵀ L⁻¹. Then
‖(W − BA)Xᵀ‖_F² = ‖(W − BA) L‖_F² = Σ_{i>k} σᵢ²: the discarded σ² are exactly
the layer's output error on the calibration inputs, and this is the best rank-k
choice for that error.

``shrink`` λ replaces C by (1−λ)C + λ·T before factorising: shrinkage toward a
target T, which keeps the whitening from over-fitting the calibration text's
correlations. ``shrink_target="diag"``: T = diag(C) (λ = 1 is a per-channel RMS
scaling, ASVD-like); ``"identity"``: T = mean(diag C)·I (ridge; λ = 1 is plain SVD),
which also protects directions the calibration text never excites.
"""

from __future__ import annotations

import torch

from rankwise.compression.calibration.stats import LayerStats
from rankwise.compression.methods.base import Method, MethodOptions, Transformed
from rankwise.compression.methods.registry import register
from rankwise.engine.whitening import cholesky_factor


def shrunk_covariance(C: torch.Tensor, shrink: float, target: str = "diag") -> torch.Tensor:
    """(1−λ)·C + λ·T with T = diag(C) or mean(diag C)·I, float64."""
    C = C.to(torch.float64)
    if shrink <= 0:
        return C
    d = torch.diagonal(C)
    if target == "diag":
        T = torch.diag(d)
    elif target == "identity":
        T = d.mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    else:
        raise ValueError(f"unknown shrinkage target {target!r}; use 'diag' or 'identity'")
    return (1.0 - shrink) * C + shrink * T


def _transform(W: torch.Tensor, stats: LayerStats | None, opts: MethodOptions, name: str) -> Transformed:
    if stats is None or stats.xtx is None:
        raise ValueError(f"whiten needs input statistics XᵀX for {name}")
    C = shrunk_covariance(stats.xtx, opts.shrink, opts.shrink_target)
    # statistics the pipeline will not read again (``extra["consumable"]``) are factorised in place: one n×n
    # float64 matrix less at the peak (0.3 GB for a 6144-wide down_proj); a shrunk C is a new matrix anyway
    consume = bool(stats.extra.get("consumable")) or C is not stats.xtx
    f = cholesky_factor(C, jitter=opts.jitter, name=name, overwrite=consume)
    if consume and C is stats.xtx:
        stats.xtx = None  # now holds the factor, not the statistics
    return Transformed(M=W @ f.S, in_solve=f.solve_right)


METHOD = register(Method("whiten", _transform, needs_xtx=True, doc="SVD-LLM truncation-aware whitening"))
