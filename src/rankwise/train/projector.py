"""Low-rank gradient projections for GaLore-style optimisers (docs/methods.md §5).

A projector maps a matrix gradient G (m×n) to a small matrix R and back:

* ``left`` side (m ≤ n under ``proj_type="std"``): Q is m×r with orthonormal
  columns, R = Qᵀ G (r×n), back-projection Q R;
* ``right`` side (m > n): Q is n×r, R = G Q (m×r), back-projection R Qᵀ.

So the Adam moments are r×n (or m×r), never m×n. Q is refreshed every
``update_proj_gap`` steps from the current gradient by one of:

* ``svd``: the top-r singular vectors of G (exact LAPACK SVD, as in GaLore);
* ``randomized``: a seeded randomized range finder (Halko et al.) with power
  iterations, then the small SVD of the sketch: same subspace up to the
  spectral gap, several times cheaper than the full SVD;
* ``dct``: SVD-free. A fixed orthonormal DCT-II basis D (d×d) is built once per
  size and shared by every matrix of that size; at each refresh the columns of D
  are scored by the row norms of DᵀG (left side) or the column norms of G D
  (right side) and the top-r indices are kept. Only those indices are stored.

The projector's whole state is plain tensors (``basis`` or ``indices``), kept in
the optimizer's per-parameter state so ``state_dict()`` round-trips it.
"""

from __future__ import annotations

import math
import threading
import time

import torch

from rankwise.engine.linalg import orthonormal_basis
from rankwise.engine.svd import thin_svd
from rankwise.errors import RankwiseError
from rankwise.train.config import PROJECTIONS  # the one list of projection names (a Registry)

PROJ_TYPES = ("std", "reverse_std", "left", "right")

_DCT_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}
_DCT_LOCK = threading.Lock()


def dct_basis(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II basis as an n×n matrix D whose *columns* are the basis vectors.

    D[i, k] = c_k cos(π (i + ½) k / n), c_0 = √(1/n), c_k = √(2/n): Dᵀ D = I.
    Built once per (size, device, dtype) and shared (callers must not modify it).
    """
    key = (int(n), str(torch.device(device)), dtype)
    with _DCT_LOCK:
        d = _DCT_CACHE.get(key)
        if d is None:
            i = torch.arange(n, dtype=torch.float64)[:, None]
            k = torch.arange(n, dtype=torch.float64)[None, :]
            d = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
            d[:, 0] = math.sqrt(1.0 / n)
            d = d.to(device=device, dtype=dtype)
            _DCT_CACHE[key] = d
    return d


def shared_dct_bases() -> dict[tuple[int, str, torch.dtype], torch.Tensor]:
    """The DCT bases built so far (for memory accounting)."""
    with _DCT_LOCK:
        return dict(_DCT_CACHE)


def check_projection(projection: str) -> str:
    """Return ``projection`` if known, else raise a one-line RankwiseError."""
    if projection not in PROJECTIONS:
        raise RankwiseError(f"unknown projection {projection!r}; use one of: {', '.join(PROJECTIONS)}.")
    return projection


def _as_int(value: object) -> int | None:
    """``value`` as an int when it is a whole number (int, integral float, digit string), else None."""
    if isinstance(value, bool):
        return None
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f == int(f) else None


def check_rank(rank: object, shape: tuple[int, int] | None = None, name: str = "") -> int:
    """Validate a projection rank: a positive int, at most min(m, n) of the matrix when given."""
    value = _as_int(rank)
    if value is None or value <= 0:
        raise RankwiseError(f"rank must be a positive integer, got {rank!r}; e.g. --rank 128.")
    if shape is not None:
        m, n = shape
        if value > min(m, n):
            what = f" of {name}" if name else ""
            raise RankwiseError(
                f"rank {value} is larger than the {m}x{n} matrix{what} (at most {min(m, n)}); "
                f"lower --rank or leave that matrix out of the low-rank group."
            )
    return value


def check_gap(gap: object) -> int:
    """Validate ``update_proj_gap`` (a positive whole number of steps)."""
    value = _as_int(gap)
    if value is None or value <= 0:
        raise RankwiseError(
            f"update_proj_gap must be a positive whole number of steps, got {gap!r}; e.g. --update-gap 200."
        )
    return value


def projection_side(shape: tuple[int, int], proj_type: str = "std") -> str:
    """'left' or 'right': which side of an m×n gradient is projected (galore-torch's rule)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise RankwiseError(f"unknown proj_type {proj_type!r}; use one of: {', '.join(PROJ_TYPES)}.")


def _top_singular_vectors(g: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Exact top-r left (side='left', m×r) or right (n×r) singular vectors of g."""
    u, _, vh = thin_svd(g)
    return u[:, :rank].contiguous() if side == "left" else vh[:rank].T.contiguous()


def _randomized_range(
    g: torch.Tensor, rank: int, side: str, oversample: int, niter: int, generator: torch.Generator
) -> torch.Tensor:
    """Top-r singular subspace of g by a seeded randomized range finder (Halko, Martinsson, Tropp 2011)."""
    a = g if side == "left" else g.T  # we want the top left singular vectors of a (d×e)
    d, e = a.shape
    q = min(d, e, rank + max(0, oversample))
    omega = torch.randn(e, q, generator=generator, dtype=a.dtype, device="cpu").to(a.device)
    y = a @ omega
    for _ in range(niter):
        y = orthonormal_basis(y)
        y = a @ (a.T @ y)
    basis = orthonormal_basis(y)
    small = basis.T @ a  # q×e
    ub, _, _ = thin_svd(small)
    return (basis @ ub[:, :rank]).contiguous()


def dct_scores(g: torch.Tensor, side: str) -> torch.Tensor:
    """Score of every DCT column: ‖(DᵀG)_i‖ (left side) or ‖(G D)_{:,i}‖ (right side)."""
    if side == "left":
        d = dct_basis(g.shape[0], g.device, g.dtype)
        return torch.linalg.vector_norm(d.T @ g, dim=1)
    d = dct_basis(g.shape[1], g.device, g.dtype)
    return torch.linalg.vector_norm(g @ d, dim=0)


class Projector:
    """Refreshes and applies one parameter's projection; its tensors live in ``state``.

    ``state`` is the optimizer's per-parameter dict: the projector writes
    ``proj_basis`` (d×r float, svd/randomized) or ``proj_indices`` (r int64, dct)
    there, so saving and loading the optimizer restores the projection exactly.
    ``refresh_seconds`` (class-level list) collects the wall time of every refresh.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        rank: int,
        projection: str = "svd",
        proj_type: str = "std",
        oversample: int = 8,
        niter: int = 1,
        seed: int = 0,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.rank = check_rank(rank, self.shape)
        self.projection = check_projection(projection)
        self.side = projection_side(self.shape, proj_type)
        self.oversample = oversample
        self.niter = niter
        self.seed = seed

    @property
    def dim(self) -> int:
        """Size of the projected dimension (m for left, n for right)."""
        return self.shape[0] if self.side == "left" else self.shape[1]

    def refresh(self, g: torch.Tensor, state: dict, step: int) -> float:
        """Compute a new projection from gradient ``g``; returns the seconds it took."""
        t0 = time.perf_counter()
        work = g if g.dtype in (torch.float32, torch.float64) else g.float()
        if self.projection == "svd":
            state["proj_basis"] = _top_singular_vectors(work, self.rank, self.side).to(g.dtype)
        elif self.projection == "randomized":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
            state["proj_basis"] = _randomized_range(work, self.rank, self.side, self.oversample, self.niter, gen).to(
                g.dtype
            )
        else:
            scores = dct_scores(work, self.side)
            idx = torch.topk(scores, self.rank, sorted=True).indices
            state["proj_indices"] = idx.to(torch.long)
        return time.perf_counter() - t0

    def basis(self, state: dict, like: torch.Tensor) -> torch.Tensor:
        """The d×r matrix Q with orthonormal columns for the current projection."""
        if self.projection == "dct":
            d = dct_basis(self.dim, like.device, like.dtype)
            return d.index_select(1, state["proj_indices"].to(like.device))
        q = state["proj_basis"]
        return q if q.dtype == like.dtype else q.to(like.dtype)

    def project(self, g: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """R = Qᵀ G (left) or G Q (right)."""
        return q.T @ g if self.side == "left" else g @ q

    def project_back(self, r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Q R (left) or R Qᵀ (right): an m×n matrix in the projected subspace."""
        return q @ r if self.side == "left" else r @ q.T
