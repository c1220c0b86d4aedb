"""Singular subspaces and spectra of submatrices: what ``inspect`` needs beyond singular values.

* :func:`left_singular_vectors`: U of W through a float64 symmetric eigensolver;
* :func:`intruder_count`: intruder dimensions of a fine-tuned matrix against its base
  (top singular vectors of W′ with no close counterpart among those of W);
* :func:`farms_eigenvalues`: the pooled spectrum of square submatrices (FARMS), whose
  heavy-tail α does not depend on the matrix's aspect ratio.

Formulas and references: docs/methods.md §1.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def left_singular_vectors(w: torch.Tensor, rel_floor: float = 1e-12) -> torch.Tensor:
    """Left singular vectors of ``w`` (m×n), columns by descending σ, via a float64 symmetric eigensolver.

    For m ≤ n they are the eigenvectors of W Wᵀ; for m > n, U = W V Σ⁻¹ from the
    eigenvectors V of WᵀW (directions with σ below ``rel_floor``·σ₁ dropped).
    In float64 this is accurate to ~1e-16·σ₁/σᵢ and several times cheaper than
    ``torch.linalg.svd`` with vectors on CPU.
    """
    x = w.detach().to(torch.float64)
    m, n = x.shape
    if m <= n:
        _, q = torch.linalg.eigh(x @ x.T)
        return q.flip(-1)
    lam, v = torch.linalg.eigh(x.T @ x)
    lam, v = lam.flip(-1), v.flip(-1)
    sv = lam.clamp_min(0).sqrt()
    keep = sv > rel_floor * float(sv[0]) if len(sv) else sv > 0
    return (x @ v[:, keep]) / sv[keep]


def intruder_count(w0: torch.Tensor, w1: torch.Tensor, top: int, eps: float) -> int:
    """How many of the ``top`` left singular vectors of ``w1`` have max |cos| < ``eps`` to every one of ``w0``."""
    u0 = left_singular_vectors(w0)
    u1 = left_singular_vectors(w1)
    k = min(top, u1.shape[1])
    sim = (u1[:, :k].T @ u0).abs().max(dim=1).values
    return int((sim < eps).sum())


def farms_eigenvalues(w: torch.Tensor, side: int | None = None) -> np.ndarray:
    """Eigenvalues of square submatrices of ``w`` pooled into one spectrum (FARMS).

    The matrix is covered by ``side``×``side`` windows (default: half the
    smaller dimension, at least 16), evenly spaced along each axis with overlap
    where the size does not divide; each window's eigenvalues σ² are computed
    (batched), scaled by 1/side so windows of a matrix are comparable, and
    pooled. Pooling equal-size windows is averaging their eigenvalue densities
    at one fixed aspect ratio (1), which removes the aspect-ratio bias of
    fitting α on the whole rectangular matrix.
    """
    m, n = w.shape
    p = min(m, n)
    s = int(side) if side else max(min(16, p), p // 2)
    s = max(1, min(s, p))

    def starts(size: int) -> list[int]:
        k = max(1, math.ceil(size / s))
        if k == 1:
            return [0]
        return sorted({round(i * (size - s) / (k - 1)) for i in range(k)})

    x = w.detach().to(torch.float32)
    blocks = [x[r : r + s, c : c + s] for r in starts(m) for c in starts(n)]
    sv = torch.linalg.svdvals(torch.stack(blocks))
    return ((sv.double() ** 2) / s).flatten().cpu().numpy()
