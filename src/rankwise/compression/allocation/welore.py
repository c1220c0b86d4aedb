"""WeLore's data-free, non-uniform rank allocation (docs/methods.md §1 and §2).

Each matrix's singular values are normalised by its largest (σᵢ/σ₁ ∈ [0, 1]).
One model-wide threshold t keeps, in every matrix, the directions with
σᵢ/σ₁ ≥ t. A matrix whose kept rank would not cut its parameters by at least
``min_saving`` (a fraction of m·n) stays dense: it is a non-low-rank component
(N-LRC); the others are low-rank components (LRC). t is found by bisection over
the finite set of normalised singular values so that the model removes at least
the requested fraction ρ of the targeted parameters (the smallest such t).
A matrix whose kept rank exceeds its ``max_ranks`` limit (e.g. the speed
break-even) is an N-LRC too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rankwise.errors import RankwiseError

DEFAULT_MIN_SAVING = 0.1


@dataclass
class WeLoreAllocation:
    """The threshold found, each matrix's kept rank (None = dense N-LRC), and the achieved ratio."""

    threshold: float
    ranks: list[int | None]
    lrc: list[bool]
    achieved_ratio: float


def _plan(
    normed: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]], t: float, min_saving: float,
    limits: Sequence[int | None] | None = None,
) -> tuple[list[int | None], int]:
    ranks: list[int | None] = []
    saved = 0
    for j, (s, (m, n)) in enumerate(zip(normed, shapes)):
        k = max(1, int((s >= t).sum()))
        gain = m * n - k * (m + n)
        if gain >= min_saving * m * n and gain > 0 and (limits is None or k <= limits[j]):
            ranks.append(k)
            saved += gain
        else:
            ranks.append(None)
    return ranks, saved


def welore_allocation(
    spectra: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, int]],
    ratio: float,
    min_saving: float = DEFAULT_MIN_SAVING,
    max_ranks: Sequence[int] | None = None,
) -> WeLoreAllocation:
    """Find WeLore's global threshold for compression ratio ``ratio`` (fraction of parameters removed)."""
    normed = [s.detach().double() / s.detach().double().max().clamp_min(1e-300) for s in spectra]
    total = sum(m * n for m, n in shapes)
    target = ratio * total
    cands = torch.unique(torch.cat(normed)).sort().values  # ascending; saved(t) is non-decreasing in t
    lo, hi = 0, len(cands) - 1
    ranks_hi, saved_hi = _plan(normed, shapes, float(cands[hi]) + 1e-12, min_saving, max_ranks)
    if saved_hi < target:
        raise RankwiseError(
            f"ratio {ratio} cannot be reached with WeLore allocation (at most {saved_hi / total:.3f} of the "
            f"targeted parameters can be removed); use a smaller --ratio."
        )
    while lo < hi:
        mid = (lo + hi) // 2
        _, saved = _plan(normed, shapes, float(cands[mid]), min_saving, max_ranks)
        if saved >= target:
            hi = mid
        else:
            lo = mid + 1
    t = float(cands[lo])
    ranks, saved = _plan(normed, shapes, t, min_saving, max_ranks)
    return WeLoreAllocation(
        threshold=t, ranks=ranks, lrc=[r is not None for r in ranks], achieved_ratio=saved / total
    )
