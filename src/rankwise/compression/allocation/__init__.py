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
from rankwise.registry import Registry

#: allocators by name; each entry is a callable ``(shapes, ratio, energies, **options) -> Allocation``
ALLOCATORS: Registry = Registry("allocation")
NEEDS_SPECTRA = {"energy", "welore", "global"}


def _welore(shapes, ratio, energies, **options) -> Allocation:
    w = welore_allocation([e.clamp_min(0).sqrt() for e in energies], shapes, ratio,
                          **{k: v for k, v in options.items() if k == "min_saving"})
    ranks = normalise_ranks(shapes, w.ranks)
    return Allocation(ranks=ranks, achieved_ratio=achieved_ratio(shapes, ranks), info={"threshold": w.threshold})


ALLOCATORS.register("uniform", lambda shapes, ratio, energies, **options: uniform_allocation(shapes, ratio))
ALLOCATORS.register("energy", lambda shapes, ratio, energies, **options: energy_allocation(energies, shapes, ratio))
ALLOCATORS.register("welore", _welore)
ALLOCATORS.register("global", lambda shapes, ratio, energies, **options: global_allocation(
    energies, shapes, ratio, **{k: v for k, v in options.items() if k in ("norm", "sensitivity", "min_rank_frac")}))


def allocate(
    name: str,
    shapes: Sequence[tuple[int, int]],
    ratio: float,
    energies: Sequence[torch.Tensor] | None = None,
    **options,
) -> Allocation:
    """Rank map for ``ratio`` by allocator ``name``; ``energies`` (σᵢ² per matrix) for all but uniform."""
    fn = ALLOCATORS.get(name)
    check_reachable(shapes, ratio)
    if name in NEEDS_SPECTRA and energies is None:
        raise ValueError(f"allocation {name!r} needs the spectra of the matrices")
    return fn(shapes, ratio, energies, **options)


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
