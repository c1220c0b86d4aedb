"""Factorisations of a layer's input second moment C = XᵀX, in float64 (docs/methods.md §3).

SVD-LLM whitening needs S with S Sᵀ = C and its inverse. Cholesky is tried
first with growing diagonal jitter; if C stays indefinite (rank-deficient
statistics, too few calibration tokens) we fall back to a clamped symmetric
eigendecomposition S = Q Λ^{1/2}, which satisfies the same identity on C's range.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass
class WhiteningFactor:
    """``S`` (n×n, S Sᵀ ≈ C), its inverse, and how it was obtained."""

    S: torch.Tensor
    S_inv: torch.Tensor
    method: str  # "cholesky" or "eigh"
    jitter: float


def cholesky_factor(
    C: torch.Tensor,
    jitter: float = 1e-6,
    max_tries: int = 6,
    name: str = "matrix",
    warn: bool = True,
) -> WhiteningFactor:
    """Return S with S Sᵀ = C + εI (ε relative to mean(diag C)), float64.

    Tries Cholesky with ε = 0, jitter, 10·jitter, …; on failure uses an
    eigendecomposition with eigenvalues clamped at ``jitter``·mean(diag) and
    warns naming ``name``.
    """
    # Memory: at most two n×n float64 matrices at a time beside the caller's C (the symmetrised copy and L,
    # then L and its inverse): the jitter goes onto the diagonal in place and L⁻¹ overwrites the identity.
    # For a 14336-wide down_proj that is 3.3 GB instead of the 8 GB an eye + jittered copy + solve would take.
    C = C.detach().to(torch.float64)
    sym = C + C.T
    sym.mul_(0.5)
    diag = sym.diagonal()
    scale = float(diag.mean().clamp_min(1e-30))
    eps = applied = 0.0
    for t in range(max_tries):
        diag.add_((eps - applied) * scale)
        applied = eps
        L, info = torch.linalg.cholesky_ex(sym)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            del sym, diag
            eye = torch.eye(L.shape[0], dtype=torch.float64, device=L.device)
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False, out=eye)
            return WhiteningFactor(S=L, S_inv=L_inv, method="cholesky", jitter=eps)
        del L
        eps = jitter * (10**t)
    diag.sub_(applied * scale)
    C = sym
    if warn:
        warnings.warn(
            f"input statistics of {name} are singular or indefinite; using a clamped "
            f"eigendecomposition instead of Cholesky (more calibration tokens would help)",
            stacklevel=2,
        )
    lam, Q = torch.linalg.eigh(C)
    lam = lam.clamp_min(jitter * scale)
    root = lam.sqrt()
    return WhiteningFactor(S=Q * root, S_inv=(Q / root).T, method="eigh", jitter=jitter)


def inverse_sqrt_factor(C: torch.Tensor, floor: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-based (Q Λ^{1/2}, Λ^{-1/2} Qᵀ) of a symmetric PSD C, float64 (EoRA's projection)."""
    C = C.detach().to(torch.float64)
    lam, Q = torch.linalg.eigh(0.5 * (C + C.T))
    lam = lam.clamp_min(floor * float(lam.abs().max().clamp_min(1e-30)))
    root = lam.sqrt()
    return Q * root, (Q / root).T
