"""Rank allocators by name: uniform, energy, welore, global (see each module)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rankwise.compression.allocation.base import (
    Allocation,
    achieved_ratio,
    check_reachable,
    kept_params,
    max_ratio,
    normalise_ranks,
)
from rankwise.compression.allocation.energy import energy_allocation
from rankwise.compression.allocation.greedy import global_allocation
from rankwise.compression.allocation.uniform import uniform_allocation
from rankwise.compression.allocation.welore import welore_allocation
from rankwise.errors import RankwiseError

ALLOCATORS = ("uniform", "energy", "welore", "global")
NEEDS_SPECTRA = {"energy", "welore", "global"}


def allocate(
    name: str,
    shapes: Sequence[tuple[int, int]],
    ratio: float,
    energies: Sequence[torch.Tensor] | None = None,
    **options,
) -> Allocation:
    """Rank map for ``ratio`` by allocator ``name``; ``energies`` (σᵢ² per matrix) for all but uniform."""
    check_reachable(shapes, ratio)
    if name == "uniform":
        return uniform_allocation(shapes, ratio)
    if name not in ALLOCATORS:
        raise RankwiseError(f"unknown allocation {name!r}; choose one of {', '.join(ALLOCATORS)}.")
    if energies is None:
        raise ValueError(f"allocation {name!r} needs the spectra of the matrices")
    if name == "energy":
        return energy_allocation(energies, shapes, ratio)
    if name == "welore":
        w = welore_allocation([e.clamp_min(0).sqrt() for e in energies], shapes, ratio,
                              **{k: v for k, v in options.items() if k == "min_saving"})
        ranks = normalise_ranks(shapes, w.ranks)
        return Allocation(ranks=ranks, achieved_ratio=achieved_ratio(shapes, ranks), info={"threshold": w.threshold})
    return global_allocation(
        energies, shapes, ratio, **{k: v for k, v in options.items() if k in ("norm", "sensitivity", "min_rank_frac")}
    )


__all__ = [
    "ALLOCATORS",
    "Allocation",
    "NEEDS_SPECTRA",
    "achieved_ratio",
    "allocate",
    "check_reachable",
    "energy_allocation",
    "global_allocation",
    "kept_params",
    "max_ratio",
    "normalise_ranks",
    "uniform_allocation",
    "welore_allocation",
]
