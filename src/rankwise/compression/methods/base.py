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
from rankwise.engine.svd import gram_eigh, thin_svd


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
    """SVD of the transformed matrix; :meth:`factors` gives (B, A) for any rank.

    Either the thin SVD itself (``U``, ``S``, ``Vh``), or its Gram form: ``M`` (float64) with ``Q``, the
    eigenvectors of its smaller Gram matrix (M Mᵀ when m ≤ n, else MᵀM), descending. In the Gram form a
    rank-k truncation needs no small singular value inverted where M is wide: B = Q_k, A = Q_kᵀ M; where M
    is tall, A = Σ_k Q_kᵀ and B = M Q_k Σ_k⁻¹ (only the kept σ, the k largest). Either way B A is the best
    rank-k approximation of M (Eckart–Young) and σ sits in A, as with the SVD.
    """

    S: torch.Tensor
    U: torch.Tensor | None = None
    Vh: torch.Tensor | None = None
    out_inv: torch.Tensor | None = None
    in_inv: torch.Tensor | None = None
    in_solve: Callable[[torch.Tensor], torch.Tensor] | None = None
    M: torch.Tensor | None = None
    Q: torch.Tensor | None = None

    @property
    def energy(self) -> torch.Tensor:
        """σᵢ² (float64): the error of discarding each direction."""
        return self.S.to(torch.float64) ** 2

    def _core(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.Q is not None and self.M is not None:
            Qk = self.Q[:, :k]
            if self.M.shape[0] <= self.M.shape[1]:
                return Qk, Qk.T @ self.M
            s = self.S[:k]
            inv = torch.where(s > s[:1].clamp_min(1e-300) * 1e-13, 1.0 / s, torch.zeros_like(s))
            return (self.M @ Qk) * inv[None, :], s[:, None] * Qk.T
        if self.U is None or self.Vh is None:
            raise ValueError("prepared without singular vectors; call prepare(..., vectors=True)")
        return self.U[:, :k], self.S[:k, None] * self.Vh[:k]

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B m×k, A k×n) in float64 for rank ``k``."""
        B, A = self._core(k)
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
        solver: str = "gram",
    ) -> Prepared:
        """Transform W (m×n, out×in) in float64 and return the SVD of M as a :class:`Prepared`.

        The statistics and transforms are float64. ``solver="gram"`` (default) decomposes M through the
        float64 eigendecomposition of its smaller Gram matrix (:func:`rankwise.engine.svd.gram_eigh`: exact,
        BLAS-3, 3× faster than LAPACK's SVD here); ``"svd"`` takes LAPACK's thin SVD, in float64 for float64
        weights and float32 otherwise. ``vectors=False`` gives the singular values only (allocation).
        """
        t = self.transform(W.detach().to(torch.float64), stats, options or MethodOptions(), name)
        if not vectors:  # spectra only (allocation): no vectors or inverse kept. σ from the same eigh as the
            # factors' (not eigvalsh, whose last bits differ): with or without kept factors, in one process or
            # several, the allocator sees identical spectra and gives the identical rank map
            return Prepared(S=gram_eigh(t.M)[0])
        if solver == "svd":
            svd_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
            U, S, Vh = thin_svd(t.M.to(svd_dtype))
            return Prepared(S=S.to(torch.float64), U=U.to(torch.float64), Vh=Vh.to(torch.float64),
                            out_inv=t.out_inv, in_inv=t.in_inv, in_solve=t.in_solve)
        if solver != "gram":
            raise ValueError(f"unknown solver {solver!r}; use 'gram' or 'svd'")
        S, Q = gram_eigh(t.M)
        return Prepared(S=S, M=t.M, Q=Q, out_inv=t.out_inv, in_inv=t.in_inv, in_solve=t.in_solve)
