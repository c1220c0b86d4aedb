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


def _cholesky_in_place(C: torch.Tensor) -> bool:
    """Factor the float64 CPU matrix C in place (C becomes L); on failure C is restored and False returned.

    torch's ``cholesky_ex(out=C)`` zeroes the other triangle, so a failed attempt could not be undone; LAPACK's
    own ``dpotrf`` (through SciPy) touches one triangle only. The row-major C seen in column-major order is Cᵀ =
    C; asking for the upper factor U (UᵀU = C) writes U into the column-major upper triangle, which is the
    row-major lower triangle: there it reads L = Uᵀ. The row-major strict upper triangle keeps C's values, and a
    failure is undone by mirroring it back (bit for bit where C is exactly symmetric; an accumulated XᵀX, whose
    triangles differ in the last bits, comes back as its upper triangle's symmetric matrix).
    """
    from scipy.linalg import lapack

    diag = C.diagonal().clone()
    a = C.numpy()
    out, info = lapack.dpotrf(a.T, lower=0, clean=0, overwrite_a=1)
    if out.ctypes.data != a.ctypes.data:  # LAPACK worked on a copy: take its factor, C is untouched
        if info == 0:
            C.copy_(torch.from_numpy(out.T))
            C.tril_()
        return info == 0
    if info == 0:
        C.tril_()
        if bool(torch.isfinite(C).all()):
            return True
    _lower_from_upper(C)
    C.diagonal().copy_(diag)
    return False


def _lower_from_upper(C: torch.Tensor, block: int = 512) -> None:
    """Mirror C's strict upper triangle into its lower one, in place, with block-sized temporaries only."""
    n = C.shape[0]
    for s in range(0, n, block):
        e = min(n, s + block)
        C[s:e, :s].copy_(C[:s, s:e].T)
        d = C[s:e, s:e]
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)


def cholesky_factor(
    C: torch.Tensor,
    jitter: float = 1e-6,
    max_tries: int = 6,
    name: str = "matrix",
    warn: bool = True,
    overwrite: bool = False,
) -> WhiteningFactor:
    """Return S with S Sᵀ = C + εI (ε relative to mean(diag C)), float64.

    Tries Cholesky with ε = 0, jitter, 10·jitter, …; on failure uses an
    eigendecomposition with eigenvalues clamped at ``jitter``·mean(diag) and
    warns naming ``name``. Only C's lower triangle is read (C is symmetric). ``C`` is
    not modified, unless ``overwrite`` (a float64 CPU matrix the caller no longer needs):
    then the factor is computed in C's own memory.
    """
    # Memory: one n×n float64 matrix beside the caller's C (a working copy that becomes L; none with
    # ``overwrite``), also when jitter is needed: the jitter goes onto the working copy's diagonal and a failed
    # attempt is undone in place (no symmetrised copy, no identity, no explicit inverse; see WhiteningFactor).
    # Statistics from fewer tokens than the matrix is wide (8B's 14336-wide down_proj on 8192 tokens) are
    # singular and take the jitter path, so it matters as much as the first attempt. For a 14336-wide
    # down_proj: 1.6 GB (0 with overwrite) instead of 4.9 GB.
    C = C.detach().to(torch.float64)
    scale = float(C.diagonal().mean().clamp_min(1e-30))
    in_place = C.device.type == "cpu"  # LAPACK dpotrf through SciPy (a dependency)
    work = C if overwrite and in_place and C.is_contiguous() else C.clone(memory_format=torch.contiguous_format)
    diag = work.diagonal()
    applied = 0.0
    for t in range(max_tries):
        eps = 0.0 if t == 0 else jitter * 10 ** (t - 1)
        diag.add_((eps - applied) * scale)
        applied = eps
        if in_place:
            if _cholesky_in_place(work):
                return WhiteningFactor(S=work, method="cholesky", jitter=eps)
        else:
            L, info = torch.linalg.cholesky_ex(work)
            if int(info) == 0 and bool(torch.isfinite(L).all()):
                return WhiteningFactor(S=L, method="cholesky", jitter=eps)
            del L
    diag.sub_(applied * scale)
    if warn:
        warnings.warn(
            f"input statistics of {name} are singular or indefinite; using a clamped "
            f"eigendecomposition instead of Cholesky (more calibration tokens would help)",
            stacklevel=2,
        )
    lam, Q = torch.linalg.eigh(work)  # reads the lower triangle, like Cholesky
    del work, diag
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
