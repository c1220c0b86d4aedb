"""What every allocator returns, and the shared budget arithmetic.

A rank map gives each targeted matrix either a rank k (it becomes B A with
k(m+n) numbers) or ``None`` (it stays dense: mn numbers). The achieved ratio is
the fraction of the targeted parameters removed (docs/methods.md). A factorised
matrix must have k < break-even rank ⌈mn/(m+n)⌉, otherwise it stays dense.

``max_ranks`` (optional, one per matrix): the largest rank a matrix may be
factorised at, e.g. its *speed* break-even (the largest rank at which the two
factor matmuls are not slower than the dense one,
:func:`rankwise.evaluation.cost_model.speed_max_ranks`); 0 = keep it dense.
Every allocator honours it: a matrix whose rank would exceed it stays dense
(``uniform`` caps it instead and spreads the budget over the others).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rankwise.engine.metrics import break_even_rank
from rankwise.errors import RankwiseError


@dataclass
class Allocation:
    """Rank per matrix (None = dense), the achieved ratio, and allocator details."""

    ranks: list[int | None]
    achieved_ratio: float
    info: dict = field(default_factory=dict)


def kept_params(shape: tuple[int, int], rank: int | None) -> int:
    """Numbers stored for one matrix at ``rank`` (dense when None or at/above break-even)."""
    m, n = shape
    if rank is None or rank >= break_even_rank(m, n):
        return m * n
    return rank * (m + n)


def achieved_ratio(shapes: Sequence[tuple[int, int]], ranks: Sequence[int | None]) -> float:
    """Fraction of the targeted parameters removed by ``ranks``."""
    total = sum(m * n for m, n in shapes)
    kept = sum(kept_params(s, r) for s, r in zip(shapes, ranks))
    return 1.0 - kept / total if total else 0.0


def rank_limits(shapes: Sequence[tuple[int, int]], max_ranks: Sequence[int] | None = None) -> list[int]:
    """Largest rank each matrix may be factorised at: break-even − 1, or ``max_ranks`` when lower (≥ 0)."""
    limits = [break_even_rank(m, n) - 1 for m, n in shapes]
    if max_ranks is None:
        return limits
    if len(max_ranks) != len(shapes):
        raise ValueError(f"max_ranks has {len(max_ranks)} entries for {len(shapes)} matrices")
    return [max(0, min(lim, int(c))) for lim, c in zip(limits, max_ranks)]


def normalise_ranks(
    shapes: Sequence[tuple[int, int]], ranks: Sequence[int | None], max_ranks: Sequence[int] | None = None
) -> list[int | None]:
    """Turn ranks at or above break-even, above ``max_ranks`` (or below 1) into ``None`` (dense)."""
    out: list[int | None] = []
    for lim, r in zip(rank_limits(shapes, max_ranks), ranks):
        out.append(None if r is None or r < 1 or r > lim else int(r))
    return out


def max_ratio(shapes: Sequence[tuple[int, int]], max_ranks: Sequence[int] | None = None) -> float:
    """The largest ratio reachable at all: rank 1 wherever a factorisation saves anything (and is allowed)."""
    return achieved_ratio(shapes, normalise_ranks(shapes, [1] * len(shapes), max_ranks))


def check_reachable(shapes: Sequence[tuple[int, int]], ratio: float, max_ranks: Sequence[int] | None = None) -> None:
    """Raise a one-line error if ``ratio`` cannot be reached even at rank 1 everywhere (within ``max_ranks``)."""
    if max_ranks is not None:
        best = max_ratio(shapes, max_ranks)
        if ratio > best + 1e-12 and ratio <= max_ratio(shapes) + 1e-12:
            raise RankwiseError(
                f"ratio {ratio} cannot be reached without factorised layers slower than dense: at most {best:.4f} "
                "of the targeted parameters can be removed within the speed break-even ranks; use a smaller "
                "--ratio or --speed-guard off."
            )
    best = max_ratio(shapes)
    if ratio > best + 1e-12:
        if best <= 0:
            raise RankwiseError(
                f"ratio {ratio} cannot be reached: every targeted matrix is at its break-even rank already "
                "(a rank-1 factorisation would not save parameters); target larger layers."
            )
        raise RankwiseError(
            f"ratio {ratio} cannot be reached: at most {best:.4f} of the targeted parameters can be removed "
            "(rank 1 everywhere); use a smaller --ratio."
        )
