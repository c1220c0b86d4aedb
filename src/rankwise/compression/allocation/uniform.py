"""uniform: every matrix keeps k = ⌊(1−ρ)·mn/(m+n)⌋ (the SVD-LLM convention), at least 1."""

from __future__ import annotations

from collections.abc import Sequence

from rankwise.compression.allocation.base import Allocation, achieved_ratio, normalise_ranks


def uniform_allocation(shapes: Sequence[tuple[int, int]], ratio: float) -> Allocation:
    """Same parameter fraction kept in every matrix; matrices where rank 1 saves nothing stay dense."""
    ranks = [max(1, int((1.0 - ratio) * m * n // (m + n))) for m, n in shapes]
    ranks = normalise_ranks(shapes, ranks)
    return Allocation(ranks=ranks, achieved_ratio=achieved_ratio(shapes, ranks), info={})
