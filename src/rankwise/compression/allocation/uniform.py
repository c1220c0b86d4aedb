"""uniform: every matrix keeps k = ⌊(1−ρ)·mn/(m+n)⌋ (the SVD-LLM convention), at least 1.

With per-matrix rank limits (``max_ranks``, e.g. the speed break-even ranks) a matrix whose
uniform rank is above its limit is *capped* at it (limit 0: kept dense). Capping removes more
than asked, so capped matrices are then turned back to dense, largest saving first, while the
model still removes at least ρ, and the rest of the surplus raises the kept fraction f of the
uncapped matrices (bisection: the largest f that still removes ρ); the achieved ratio says how
closely the budget was met. If limits of 0 leave the model short of ρ, the kept fraction f
of the other matrices is lowered by bisection to the largest f that removes at least ρ.
Limits that do not bind leave the allocation exactly as without them.
"""

from __future__ import annotations

from collections.abc import Sequence

from rankwise.compression.allocation.base import (
    Allocation,
    achieved_ratio,
    kept_params,
    normalise_ranks,
    rank_limits,
)


def _ranks(shapes: Sequence[tuple[int, int]], keep: float, limits: Sequence[int] | None) -> list[int | None]:
    ranks = [max(1, int(keep * m * n // (m + n))) for m, n in shapes]
    if limits is not None:
        ranks = [None if lim < 1 else min(r, lim) for r, lim in zip(ranks, limits)]
    return ranks


def uniform_allocation(
    shapes: Sequence[tuple[int, int]], ratio: float, max_ranks: Sequence[int] | None = None, iters: int = 60
) -> Allocation:
    """Same parameter fraction kept in every matrix; matrices where rank 1 saves nothing stay dense."""
    plain = normalise_ranks(shapes, _ranks(shapes, 1.0 - ratio, None))
    if max_ranks is None:
        return Allocation(ranks=plain, achieved_ratio=achieved_ratio(shapes, plain), info={})
    limits = rank_limits(shapes, max_ranks)
    capped = [r is not None and r > lim for r, lim in zip(plain, limits)]
    if not any(capped):  # the limits do not bind
        return Allocation(ranks=plain, achieved_ratio=achieved_ratio(shapes, plain), info={"capped": 0})
    keep = 1.0 - ratio
    ranks = normalise_ranks(shapes, _ranks(shapes, keep, limits), max_ranks)
    densified = 0
    if achieved_ratio(shapes, ranks) < ratio:
        # limits of 0 forced matrices dense: lower the others' kept fraction (achieved(keep) is non-increasing)
        lo, hi = 0.0, keep
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if achieved_ratio(shapes, normalise_ranks(shapes, _ranks(shapes, mid, limits), max_ranks)) >= ratio:
                lo = mid
            else:
                hi = mid
        keep = lo
        ranks = normalise_ranks(shapes, _ranks(shapes, keep, limits), max_ranks)
    else:
        # capping removed more than asked: give whole capped matrices back (dense), largest saving first
        total = sum(m * n for m, n in shapes)
        removed = total - sum(kept_params(s, r) for s, r in zip(shapes, ranks))
        order = sorted((j for j, c in enumerate(capped) if c and ranks[j] is not None),
                       key=lambda j: kept_params(shapes[j], ranks[j]) - shapes[j][0] * shapes[j][1])
        for j in order:
            saving = shapes[j][0] * shapes[j][1] - kept_params(shapes[j], ranks[j])
            if removed - saving >= ratio * total - 1e-9:
                ranks[j] = None
                removed -= saving
                densified += 1
        # what is still removed beyond ρ goes to the other matrices: raise their kept fraction
        dense = [r is None for r in ranks]

        def spread(k: float) -> list[int | None]:
            return [None if d else r for d, r in zip(dense, _ranks(shapes, k, limits))]

        lo, hi = keep, 1.0
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if achieved_ratio(shapes, normalise_ranks(shapes, spread(mid), max_ranks)) >= ratio:
                lo = mid
            else:
                hi = mid
        keep = lo
        ranks = normalise_ranks(shapes, spread(keep), max_ranks)
    return Allocation(ranks=ranks, achieved_ratio=achieved_ratio(shapes, ranks),
                      info={"keep_fraction": keep, "capped": sum(capped) - densified, "densified": densified})
