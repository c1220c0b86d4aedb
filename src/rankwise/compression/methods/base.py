"""The common shape of every factorisation method.

Each method maps a weight W (m×n) and its layer's calibration statistics to a
*transformed* matrix M = D_out · W · R (D_out a diagonal output-side scaling,
R an input-side transform), takes the SVD of M, truncates it to rank k, and
maps back: W ≈ D_out⁻¹ U_k diag(σ_k) V_kᵀ R⁻¹, so

* B = D_out⁻¹ U_k      (m×k, output side)
* A = diag(σ_k) V_kᵀ R⁻¹ (k×n, input side).

The σᵢ² of M are the error each discarded direction costs in the method's own
metric (plain Frobenius for svd, the layer's output error for whiten, ...),
which is what the allocators rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rankwise.compression.calibration.stats import LayerStats
from rankwise.engine.svd import singular_values, thin_svd


@dataclass
class MethodOptions:
    """Knobs shared by the methods (set from :class:`rankwise.compression.api.CompressConfig`)."""

    asvd_alpha: float = 0.5
    shrink: float = 0.0  # whiten: C ← (1−λ)·C + λ·T
    shrink_target: str = "diag"  # T = diag(C) or mean(diag C)·I ("identity")
    jitter: float = 1e-6


@dataclass
class Transformed:
    """M = D_out W R with the inverses needed to map truncated factors back."""

    M: torch.Tensor  # float64 m×n
    out_inv: torch.Tensor | None = None  # (m,) diagonal of D_out⁻¹
    in_inv: torch.Tensor | None = None  # (n,) diagonal or (n×n) matrix R⁻¹
    # or R⁻¹ applied lazily from the right, A ↦ A R⁻¹ (a triangular solve: no n×n inverse is formed)
    in_solve: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Prepared:
    """SVD of the transformed matrix; :meth:`factors` gives (B, A) for any rank."""

    S: torch.Tensor
    U: torch.Tensor | None = None
    Vh: torch.Tensor | None = None
    out_inv: torch.Tensor | None = None
    in_inv: torch.Tensor | None = None
    in_solve: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def energy(self) -> torch.Tensor:
        """σᵢ² (float64): the error of discarding each direction."""
        return self.S.to(torch.float64) ** 2

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B m×k, A k×n) in float64 for rank ``k``."""
        if self.U is None or self.Vh is None:
            raise ValueError("prepared without singular vectors; call prepare(..., vectors=True)")
        B = self.U[:, :k]
        A = self.S[:k, None] * self.Vh[:k]
        if self.out_inv is not None:
            B = self.out_inv[:, None] * B
        if self.in_inv is not None:
            A = A * self.in_inv[None, :] if self.in_inv.dim() == 1 else A @ self.in_inv
        if self.in_solve is not None:
            A = self.in_solve(A)
        return B, A


@dataclass
class Method:
    """A registered factorisation method."""

    name: str
    transform: Callable[[torch.Tensor, LayerStats | None, MethodOptions, str], Transformed]
    needs_xtx: bool = False
    needs_abs: bool = False
    needs_grad: bool = False
    doc: str = ""

    @property
    def needs_data(self) -> bool:
        return self.needs_xtx or self.needs_abs or self.needs_grad

    def prepare(
        self,
        W: torch.Tensor,
        stats: LayerStats | None,
        options: MethodOptions | None = None,
        name: str = "matrix",
        vectors: bool = True,
    ) -> Prepared:
        """Transform W (m×n, out×in) in float64 and return the SVD of M as a :class:`Prepared`.

        The statistics and transforms are float64; the SVD itself runs in float64 for float64
        weights and in float32 otherwise (twice as fast, and far below the storage precision).
        """
        t = self.transform(W.detach().to(torch.float64), stats, options or MethodOptions(), name)
        svd_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
        M = t.M.to(svd_dtype)
        if not vectors:
            return Prepared(S=singular_values(M).to(torch.float64))  # spectra only: no inverse kept
        U, S, Vh = thin_svd(M)
        return Prepared(
            S=S.to(torch.float64), U=U.to(torch.float64), Vh=Vh.to(torch.float64), out_inv=t.out_inv, in_inv=t.in_inv,
            in_solve=t.in_solve,
        )
