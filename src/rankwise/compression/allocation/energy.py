"""energy: one model-wide energy fraction τ; each matrix keeps its energy rank r_τ.

r_τ = smallest k with Σ_{i≤k} σᵢ² ≥ τ·Σσᵢ² of the method's (possibly whitened)
spectrum. τ is found by bisection so that the model removes at least ρ of the
targeted parameters (the largest such τ). Matrices whose r_τ reaches break-even
(or exceeds their ``max_ranks`` limit, e.g. the speed break-even) stay dense.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rankwise.compression.allocation.base import Allocation, achieved_ratio, normalise_ranks


def _ranks(cums: list[torch.Tensor], tau: float) -> list[int]:
    out = []
    for c in cums:
        k = int(torch.searchsorted(c, torch.tensor(tau * (1 - 1e-12), dtype=torch.float64))) + 1
        out.append(min(max(k, 1), len(c)))
    return out


def energy_allocation(
    energies: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]], ratio: float, iters: int = 60,
    max_ranks: Sequence[int] | None = None,
) -> Allocation:
    """Bisection on τ ∈ (0, 1] for the budget ``ratio``; ``energies`` are σᵢ² per matrix (descending)."""
    cums = []
    for e in energies:
        e = e.detach().to(torch.float64).clamp_min(0)
        tot = float(e.sum())
        cums.append(torch.cumsum(e, 0) / tot if tot > 0 else torch.ones(len(e), dtype=torch.float64))
    lo, hi = 0.0, 1.0  # achieved(τ) decreases with τ; find the largest τ with achieved ≥ ratio
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if achieved_ratio(shapes, normalise_ranks(shapes, _ranks(cums, mid), max_ranks)) >= ratio:
            lo = mid
        else:
            hi = mid
    ranks = normalise_ranks(shapes, _ranks(cums, lo), max_ranks)
    return Allocation(ranks=ranks, achieved_ratio=achieved_ratio(shapes, ranks), info={"tau": lo})
