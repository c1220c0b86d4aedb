"""Factorisations of a layer's input second moment C = XᵀX, in float64 (docs/methods.md §3).

SVD-LLM whitening needs S with S Sᵀ = C and its inverse. Cholesky is tried
first with growing diagonal jitter; if C stays indefinite (rank-deficient
statistics, too few calibration tokens) we fall back to a clamped symmetric
eigendecomposition S = Q Λ^{1/2}, which satisfies the same identity on C's range.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch


@dataclass
class WhiteningFactor:
    """``S`` (n×n, S Sᵀ ≈ C), how it was obtained, and S⁻¹ on demand.

    The inverse is not formed unless asked for: SVD-LLM needs only ``A S⁻¹`` for the k kept rows
    (:meth:`solve_right`, a triangular solve of k·n² flops), not the n×n inverse (n³/3 flops and
    another n×n float64 matrix: 0.3 GB for a 6144-wide ``down_proj``, 1.6 GB at 14336).
    """

    S: torch.Tensor
    method: str  # "cholesky" or "eigh"
    jitter: float
    _S_inv: torch.Tensor | None = field(default=None, repr=False)

    @property
    def S_inv(self) -> torch.Tensor:
        """S⁻¹ (n×n float64), computed on first use."""
        if self._S_inv is None:
            eye = torch.eye(self.S.shape[0], dtype=self.S.dtype, device=self.S.device)
            self._S_inv = torch.linalg.solve_triangular(self.S, eye, upper=False, out=eye)
        return self._S_inv

    def solve_right(self, A: torch.Tensor) -> torch.Tensor:
        """``A S⁻¹`` (A: k×n): a triangular solve for a Cholesky factor, a product otherwise."""
        if self._S_inv is not None:
            return A.to(self._S_inv.dtype) @ self._S_inv
        return torch.linalg.solve_triangular(self.S, A.to(self.S.dtype), upper=False, left=False)


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
    warns naming ``name``. ``C`` is not modified; only its lower triangle is read
    (C is symmetric; LAPACK's Cholesky reads one triangle anyway).
    """
    # Memory, for the common case (C positive definite): L is the only n×n float64 matrix made beside the
    # caller's C (no symmetrised copy, no identity, no explicit inverse; see WhiteningFactor). A jittered copy
    # is made only when the plain Cholesky fails. For a 14336-wide down_proj that is 1.6 GB instead of 4.9 GB.
    C = C.detach().to(torch.float64)
    diag = C.diagonal()
    scale = float(diag.mean().clamp_min(1e-30))
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        return WhiteningFactor(S=L, method="cholesky", jitter=0.0)
    del L
    sym = C + C.T
    sym.mul_(0.5)
    sdiag = sym.diagonal()
    applied = 0.0
    for t in range(max_tries - 1):
        eps = jitter * (10**t)
        sdiag.add_((eps - applied) * scale)
        applied = eps
        L, info = torch.linalg.cholesky_ex(sym)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            return WhiteningFactor(S=L, method="cholesky", jitter=eps)
        del L
    sdiag.sub_(applied * scale)
    if warn:
        warnings.warn(
            f"input statistics of {name} are singular or indefinite; using a clamped "
            f"eigendecomposition instead of Cholesky (more calibration tokens would help)",
            stacklevel=2,
        )
    lam, Q = torch.linalg.eigh(sym)
    del sym
    lam = lam.clamp_min(jitter * scale)
    root = lam.sqrt()
    return WhiteningFactor(S=Q * root, method="eigh", jitter=jitter, _S_inv=(Q / root).T)


def inverse_sqrt_factor(C: torch.Tensor, floor: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-based (Q Λ^{1/2}, Λ^{-1/2} Qᵀ) of a symmetric PSD C, float64 (EoRA's projection)."""
    C = C.detach().to(torch.float64)
    lam, Q = torch.linalg.eigh(0.5 * (C + C.T))
    lam = lam.clamp_min(floor * float(lam.abs().max().clamp_min(1e-30)))
    root = lam.sqrt()
    return Q * root, (Q / root).T
