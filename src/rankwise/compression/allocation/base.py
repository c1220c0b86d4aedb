"""What every allocator returns, and the shared budget arithmetic.

A rank map gives each targeted matrix either a rank k (it becomes B A with
k(m+n) numbers) or ``None`` (it stays dense: mn numbers). The achieved ratio is
the fraction of the targeted parameters removed (docs/methods.md). A factorised
matrix must have k < break-even rank ⌈mn/(m+n)⌉, otherwise it stays dense.
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


def normalise_ranks(shapes: Sequence[tuple[int, int]], ranks: Sequence[int | None]) -> list[int | None]:
    """Turn ranks at or above break-even (or below 1) into ``None`` (dense)."""
    out: list[int | None] = []
    for (m, n), r in zip(shapes, ranks):
        out.append(None if r is None or r < 1 or r >= break_even_rank(m, n) else int(r))
    return out


def max_ratio(shapes: Sequence[tuple[int, int]]) -> float:
    """The largest ratio reachable at all: rank 1 wherever a factorisation saves anything."""
    return achieved_ratio(shapes, normalise_ranks(shapes, [1] * len(shapes)))


def check_reachable(shapes: Sequence[tuple[int, int]], ratio: float) -> None:
    """Raise a one-line error if ``ratio`` cannot be reached even at rank 1 everywhere."""
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
