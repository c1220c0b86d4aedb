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
    rank_limits,
)
from rankwise.compression.allocation.energy import energy_allocation
from rankwise.compression.allocation.greedy import global_allocation
from rankwise.compression.allocation.uniform import uniform_allocation
from rankwise.compression.allocation.welore import welore_allocation
from rankwise.registry import Registry

#: allocators by name; each entry is a callable ``(shapes, ratio, energies, **options) -> Allocation``;
#: every one honours ``options["max_ranks"]`` (per-matrix rank limits, see allocation.base)
ALLOCATORS: Registry = Registry("allocation")
NEEDS_SPECTRA = {"energy", "welore", "global"}


def _welore(shapes, ratio, energies, **options) -> Allocation:
    w = welore_allocation([e.clamp_min(0).sqrt() for e in energies], shapes, ratio,
                          **{k: v for k, v in options.items() if k in ("min_saving", "max_ranks")})
    ranks = normalise_ranks(shapes, w.ranks, options.get("max_ranks"))
    return Allocation(ranks=ranks, achieved_ratio=achieved_ratio(shapes, ranks), info={"threshold": w.threshold})


ALLOCATORS.register("uniform", lambda shapes, ratio, energies, **options: uniform_allocation(
    shapes, ratio, max_ranks=options.get("max_ranks")))
ALLOCATORS.register("energy", lambda shapes, ratio, energies, **options: energy_allocation(
    energies, shapes, ratio, max_ranks=options.get("max_ranks")))
ALLOCATORS.register("welore", _welore)
ALLOCATORS.register("global", lambda shapes, ratio, energies, **options: global_allocation(
    energies, shapes, ratio,
    **{k: v for k, v in options.items() if k in ("norm", "sensitivity", "min_rank_frac", "max_ranks")}))


def allocate(
    name: str,
    shapes: Sequence[tuple[int, int]],
    ratio: float,
    energies: Sequence[torch.Tensor] | None = None,
    max_ranks: Sequence[int] | None = None,
    **options,
) -> Allocation:
    """Rank map for ``ratio`` by allocator ``name``; ``energies`` (σᵢ² per matrix) for all but uniform.

    ``max_ranks``: per-matrix rank limits (e.g. :func:`rankwise.evaluation.cost_model.speed_max_ranks`,
    so that no factorised layer is slower than its dense one); a matrix is never factorised above
    its limit (it stays dense, or ``uniform`` caps it), and ``Allocation.info["limited"]`` counts the
    matrices whose limit lies below their parameter break-even.
    """
    fn = ALLOCATORS.get(name)
    check_reachable(shapes, ratio, max_ranks)
    if name in NEEDS_SPECTRA and energies is None:
        raise ValueError(f"allocation {name!r} needs the spectra of the matrices")
    if max_ranks is None:
        return fn(shapes, ratio, energies, **options)
    out = fn(shapes, ratio, energies, max_ranks=max_ranks, **options)
    limits = rank_limits(shapes, max_ranks)
    if any(r is not None and r > lim for r, lim in zip(out.ranks, limits)):
        raise RuntimeError(f"rankwise bug: allocation {name!r} exceeded a rank limit")
    free = rank_limits(shapes)
    out.info["limited"] = sum(lim < f for lim, f in zip(limits, free))
    return out


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
    "rank_limits",
    "uniform_allocation",
    "welore_allocation",
]
