"""Spectral metrics of one matrix, computed from its singular values (docs/methods.md §1).

Every function takes the descending singular values ``s`` (any float tensor)
and returns a Python number, so results serialise to JSON directly.
"""

from __future__ import annotations

import math

import torch


def _s64(s: torch.Tensor) -> torch.Tensor:
    return s.detach().to(torch.float64).clamp_min(0)


def break_even_rank(m: int, n: int) -> int:
    """Smallest rank k at which k(m+n) ≥ mn: a factorisation saves parameters only below it."""
    return math.ceil(m * n / (m + n))


def max_saving_rank(m: int, n: int) -> int:
    """Largest rank that still stores fewer numbers than the dense m×n matrix."""
    return break_even_rank(m, n) - 1


def energy_rank(s: torch.Tensor, tau: float) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ τ·Σσᵢ² (0 for an all-zero matrix)."""
    e = _s64(s) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0)
    # tolerance guards against the last partial sum landing a hair below τ·total
    k = int(torch.searchsorted(cum, torch.tensor(tau * total * (1 - 1e-12), dtype=torch.float64)))
    return min(k + 1, len(s))


def effective_rank(s: torch.Tensor) -> float:
    """exp of the Shannon entropy of qᵢ = σᵢ/Σσⱼ (Roy & Vetterli 2007)."""
    x = _s64(s)
    total = float(x.sum())
    if total == 0.0:
        return 0.0
    q = x / total
    q = q[q > 0]
    return float(torch.exp(-(q * torch.log(q)).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """‖W‖_F² / ‖W‖₂² = Σσᵢ² / σ₁²."""
    x = _s64(s)
    top = float(x.max()) if len(x) else 0.0
    if top == 0.0:
        return 0.0
    return float((x**2).sum() / top**2)


def nuclear_norm(s: torch.Tensor) -> float:
    """Σσᵢ."""
    return float(_s64(s).sum())


def l12_norm(w: torch.Tensor) -> float:
    """Sum of the column 2-norms of W (m×n): an SVD-free surrogate that bounds the nuclear norm."""
    return float(torch.linalg.vector_norm(w.detach().to(torch.float64), dim=0).sum())


def condition_number(s: torch.Tensor) -> float | None:
    """σ₁/σ_p; ``None`` when σ_p is zero (infinite condition number, not valid JSON)."""
    x = _s64(s)
    if len(x) == 0 or float(x[-1]) == 0.0:
        return None
    return float(x[0] / x[-1])
