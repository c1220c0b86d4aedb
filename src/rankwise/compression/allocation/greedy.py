"""global: greedy allocation of singular directions over the whole model under a parameter budget.

Every direction i of matrix j costs (m+n) parameters and, if dropped, loses
``score_ij = w_j · σ_ij² / N_j``: its share of the matrix's error metric (σ² of
the plain or whitened matrix), normalised by ``N_j`` and weighted by an optional
per-matrix sensitivity ``w_j``. Directions are kept by largest loss per
parameter until the budget (1−ρ)·Σmn is spent; every matrix keeps at least a
floor rank. When a matrix's rank reaches break-even it is stored dense (mn
numbers, which is never more than the factors) and its remaining directions
come for free. The result stays within one rank step (m+n parameters) of the
budget. With per-matrix limits ``max_ranks`` (e.g. the speed break-even rank), the
step past a matrix's limit makes it dense in the same way (its cost jumps to mn).

Normalisations ``N_j``:

* ``none``: raw σ² (a layer with a large output scale grabs the whole budget;
  measured 3–7× worse than uniform, kept for the record);
* ``total``: Σσ² of the matrix, i.e. the *relative* output error each direction
  removes (scale-free across layers);
* ``log``: score = log-gain of the relative residual error, a diminishing-returns
  variant that spreads ranks more evenly at high ratios.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from rankwise.compression.allocation.base import Allocation, achieved_ratio, normalise_ranks, rank_limits
from rankwise.errors import RankwiseError

NORMALISATIONS = ("none", "total", "log")


def _scores(e: torch.Tensor, norm: str) -> torch.Tensor:
    e = e.detach().to(torch.float64).clamp_min(0)
    tot = float(e.sum())
    if norm == "none":
        return e
    if tot <= 0:
        return torch.zeros_like(e)
    rel = e / tot
    if norm == "total":
        return rel
    if norm == "log":
        # residual relative error after keeping i directions: r_i = 1 − Σ_{j≤i} rel_j
        resid = (1.0 - torch.cumsum(rel, 0)).clamp_min(1e-12)
        before = torch.cat([torch.ones(1, dtype=torch.float64), resid[:-1]])
        return torch.log(before / resid)
    raise RankwiseError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORMALISATIONS)}.")


def global_allocation(
    energies: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, int]],
    ratio: float,
    norm: str = "total",
    sensitivity: Sequence[float] | None = None,
    min_rank_frac: float = 0.0,
    max_ranks: Sequence[int] | None = None,
) -> Allocation:
    """Greedy budgeted allocation; ``min_rank_frac`` sets a floor at that fraction of the uniform rank."""
    total = sum(m * n for m, n in shapes)
    budget = (1.0 - ratio) * total
    nmat = len(shapes)
    w = list(sensitivity) if sensitivity is not None else [1.0] * nmat
    scores = [_scores(e, norm) * float(wj) for e, wj in zip(energies, w)]
    be = [lim + 1 for lim in rank_limits(shapes, max_ranks)]  # the first rank at which a matrix is dense
    floors = []
    for m, n in shapes:
        uni = (1.0 - ratio) * m * n / (m + n)
        floors.append(max(1, int(min_rank_frac * uni)))
    ranks = [min(f, len(s)) for f, s in zip(floors, scores)]
    cost = [m * n if r >= b else r * (m + n) for (m, n), r, b in zip(shapes, ranks, be)]
    spent = sum(cost)
    if spent > budget:
        raise RankwiseError(
            f"the rank floor alone exceeds the budget of ratio {ratio}; lower min_rank_frac or the ratio."
        )
    # max-heap of (−score per parameter, matrix) for each matrix's next direction
    heap: list[tuple[float, int]] = []

    def push(j: int) -> None:
        k = ranks[j]
        if k < len(scores[j]):
            m, n = shapes[j]
            heapq.heappush(heap, (-float(scores[j][k]) / (m + n), j))

    for j in range(nmat):
        push(j)
    while heap:
        _, j = heapq.heappop(heap)
        k = ranks[j] + 1
        m, n = shapes[j]
        new = m * n if k >= be[j] else k * (m + n)
        delta = new - cost[j]
        if spent + delta > budget:
            continue  # this matrix is closed: its next direction does not fit
        ranks[j], cost[j] = k, new
        spent += delta
        push(j)
    final = normalise_ranks(shapes, ranks, max_ranks)
    return Allocation(
        ranks=final,
        achieved_ratio=achieved_ratio(shapes, final),
        info={"norm": norm, "min_rank_frac": min_rank_frac, "budget": budget, "kept": spent},
    )
