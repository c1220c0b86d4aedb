"""Dense decompositions other than the SVD (QR, symmetric eigendecomposition, LU, Cholesky, least squares).

All LAPACK / cuSOLVER calls of the package live in ``rankwise.engine`` (SVDs in
:mod:`rankwise.engine.svd`, whitening in :mod:`rankwise.engine.whitening`, these
here), so precision rules (float32 or wider; float16/bfloat16 inputs are upcast)
and thread control sit in one place. Methods: docs/methods.md.
"""

from __future__ import annotations

import torch

_WIDE = (torch.float32, torch.float64)


def _wide(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    return x if x.dtype in _WIDE else x.to(torch.float32)


def orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of ``y`` (d×q, d ≥ q): an orthonormal basis of its column space."""
    q, _ = torch.linalg.qr(_wide(y))
    return q


def sym_eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric part of ``x``."""
    x = _wide(x)
    return torch.linalg.eigh(0.5 * (x + x.mT))


def lu_decompose(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x = P L U`` with partial pivoting (P permutation, L unit lower, U upper)."""
    return torch.linalg.lu(_wide(x))


def least_squares(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmin_x ‖a x − y‖₂ (``a`` k×p with k ≥ p)."""
    return torch.linalg.lstsq(_wide(a), _wide(y)).solution


def cholesky(x: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """Cholesky factor of a symmetric positive-definite ``x`` (lower L with L Lᵀ = x, or upper U with UᵀU = x).

    Raises ``torch.linalg.LinAlgError`` when ``x`` is not positive definite (callers add damping
    or fall back, see :func:`rankwise.engine.whitening.cholesky_factor`).
    """
    return torch.linalg.cholesky(_wide(x), upper=upper)


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper U with UᵀU = h⁻¹ for a positive-definite ``h`` (GPTQ's error-propagation factor, docs/methods.md §3)."""
    lower = torch.linalg.cholesky(_wide(h))
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
