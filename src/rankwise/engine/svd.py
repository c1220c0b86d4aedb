"""Singular values and truncated SVDs, exact or randomized, batched by shape.

All decompositions run in at least float32 (float16/bfloat16 weights are
upcast). Exact LAPACK SVD is the default; the randomized path
(``torch.svd_lowrank`` with oversampling and power iterations) is for when only
the top of the spectrum is needed and speed matters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from rankwise.engine import SPECTRUM_METHODS, SVD_METHODS

_MIN_DTYPE = torch.float32


def _upcast(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    if dtype is not None:
        return w.detach().to(dtype)
    if w.dtype in (torch.float64, torch.float32):
        return w.detach()
    return w.detach().to(_MIN_DTYPE)


def singular_values(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """All singular values of one matrix, descending, in float32 (or ``dtype``)."""
    return torch.linalg.svdvals(_upcast(w, dtype))


def spectra(
    weights: Sequence[torch.Tensor],
    dtype: torch.dtype | None = None,
    max_batch_bytes: int = 512 * 2**20,
    on_done: Callable[[int], None] | None = None,
    method: str = "svd",
) -> list[torch.Tensor]:
    """Singular values of many matrices, computed in batches of equal shape.

    Matrices of one shape are stacked and decomposed in one ``svdvals`` call
    (LAPACK/MKL batch well; the Python overhead per matrix vanishes). Batches are
    capped at ``max_batch_bytes`` so memory stays bounded. ``on_done(n)`` is
    called after each batch with the number of matrices finished (for progress).
    Returns one descending float tensor per input, in input order.

    ``method="svd"`` (default) calls ``svdvals``. ``method="gram"`` takes the
    eigenvalues of the p×p Gram matrix (W Wᵀ or WᵀW, p = min(m, n)) in float64
    with ``eigvalsh`` and returns σ = √λ as float64: a symmetric
    eigensolver after one BLAS-3 product is several times faster than an SVD on
    CPU, and float64 keeps the small singular values at least as accurate as a
    float32 SVD (relative error ~1e-16·σ₁²/σᵢ² on σᵢ²).
    """
    if method not in SPECTRUM_METHODS:
        raise ValueError(f"unknown spectrum method {method!r}; use one of {', '.join(SPECTRUM_METHODS)}")
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, w in enumerate(weights):
        groups[tuple(w.shape)].append(i)
    out: list[torch.Tensor | None] = [None] * len(weights)
    for shape, idx in groups.items():
        per = max(1, int(max_batch_bytes // (4 * shape[0] * shape[1] * 3)))
        for start in range(0, len(idx), per):
            chunk = idx[start : start + per]
            if method == "gram":
                sv = _gram_svdvals(_stacked(weights, chunk, torch.float64))
            else:
                w0 = weights[chunk[0]]
                wide = w0.dtype if w0.dtype in (torch.float64, torch.float32) else _MIN_DTYPE
                sv = torch.linalg.svdvals(_stacked(weights, chunk, dtype or wide))
            for j, i in enumerate(chunk):
                out[i] = sv[j]
            if on_done is not None:
                on_done(len(chunk))
    return out  # type: ignore[return-value]


def _stacked(weights: Sequence[torch.Tensor], idx: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The matrices ``weights[idx]`` as one (b, m, n) ``dtype`` tensor, converted straight into place.

    (``torch.stack`` of converted copies would hold every matrix twice at the peak; streaming
    inspect decomposes matrices as large as memory allows one at a time, so the copy matters.)
    """
    first = weights[idx[0]]
    out = torch.empty((len(idx), *first.shape), dtype=dtype, device=first.device)
    for j, i in enumerate(idx):
        out[j].copy_(weights[i].detach())
    return out


def gram_eigh(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ descending, Q): singular values of ``w`` and the eigenvectors of its smaller Gram matrix, float64.

    Q (p×p, p = min(m, n)) holds the left singular vectors when m ≤ n and the right ones otherwise. An
    exact (not randomized) decomposition: one BLAS-3 product and ``eigh``, measured 3.3× faster on this
    CPU than a float32 ``linalg.svd`` of a 1536×6144 matrix. The vectors of a σ² separated from its
    neighbours by a gap g carry an error ~1e-16·σ₁²/g in float64, below a float32 SVD's for the kept
    directions of a weight matrix.
    """
    x = w.detach().to(torch.float64)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    lam, Q = torch.linalg.eigh(gram)  # ascending
    del gram
    return lam.flip(-1).clamp_min(0).sqrt(), Q.flip(-1)


def _gram_svdvals(stack: torch.Tensor) -> torch.Tensor:
    """Descending singular values of a (b, m, n) float64 stack via eigvalsh of the smaller Gram matrix."""
    m, n = stack.shape[-2:]
    gram = stack @ stack.mT if m <= n else stack.mT @ stack
    lam = torch.linalg.eigvalsh(gram)  # ascending
    return lam.flip(-1).clamp_min(0).sqrt()


def thin_svd(w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full thin SVD ``w = U diag(S) Vh`` (``full_matrices=False``), in float32 or wider (or ``dtype``).

    The one exact-SVD call of the package: compression methods, EoRA, GaLore's
    projector and the TRP/Cuttlefish callbacks all come here.
    """
    return torch.linalg.svd(_upcast(w, dtype), full_matrices=False)


def truncated_svd(
    w: torch.Tensor,
    rank: int,
    method: str = "exact",
    oversample: int = 10,
    niter: int = 2,
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``w ≈ U diag(S) Vᵀ``; returns ``(U m×k, S k, V n×k)``.

    ``method="exact"`` uses ``torch.linalg.svd`` (full_matrices=False);
    ``method="randomized"`` uses ``torch.svd_lowrank`` with ``q = rank +
    oversample`` and ``niter`` power iterations, then keeps the top ``rank``.
    The randomized sketch is seeded (``seed``) so results are reproducible.
    """
    m, n = w.shape
    p = min(m, n)
    if not 1 <= rank <= p:
        raise ValueError(f"rank must be in [1, {p}] for a {m}x{n} matrix, got {rank}")
    x = _upcast(w, dtype)
    if method == "exact":
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    if method == "randomized":
        q = min(p, rank + max(0, oversample))
        if seed is None:
            u, s, v = torch.svd_lowrank(x, q=q, niter=niter)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                u, s, v = torch.svd_lowrank(x, q=q, niter=niter)
        return u[:, :rank], s[:rank], v[:, :rank]
    raise ValueError(f"unknown SVD method {method!r}; use one of {', '.join(SVD_METHODS)}")
