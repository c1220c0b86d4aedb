"""The speed guard: allocate ranks so that no factorised layer runs slower than its dense original.

A rank-k factorised m×n layer does k(m+n) multiply-adds per token instead of mn,
but as two matmul calls; close to the parameter break-even it is *slower* than the
dense layer (measured: above ≈ 0.9 × break-even for 512-token prefill, ≈ 0.7–0.8 ×
for single-token decode on the project's CPU; docs/eval.md). The guard turns a
layer cost model (:mod:`rankwise.evaluation.cost_model`) into per-matrix rank
limits, ``speed_max_ranks(shapes, tokens, cost)``, and hands them to the allocator
as ``max_ranks``: a matrix whose budgeted rank would exceed its limit stays dense
(``uniform`` caps it), and the budget is re-spent on the other matrices.

Modes (``CompressConfig.speed_guard``):

* ``auto``: apply the limits; if the asked ratio cannot be reached within them
  (tiny layers, where two calls always lose to one), warn once and allocate without
  them (``Allocation.info["speed_guard_applied"]`` is then False);
* ``strict``: apply the limits; an unreachable ratio is a one-line error;
* ``off``: parameter break-even only (the allocation of rankwise ≤ round 2).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from rankwise.compression.allocation import Allocation, allocate, rank_limits
from rankwise.errors import RankwiseError

SPEED_GUARDS = ("auto", "strict", "off")


def check_speed_guard(tokens: str | int | Sequence[int], cost: str) -> None:
    """One-line error for bad ``speed_tokens`` / ``speed_cost`` (a cost-model file is read and checked)."""
    from rankwise.evaluation.cost_model import COST_SOURCES, load_cost_models, parse_tokens

    parse_tokens(tokens)
    if not isinstance(cost, str) or not cost:
        raise RankwiseError(f"speed_cost must be builtin, measure or a cost-model .json file, got {cost!r}.")
    if cost not in COST_SOURCES:
        load_cost_models(cost)


def guarded_allocate(
    name: str,
    shapes: Sequence[tuple[int, int]],
    ratio: float,
    energies: Sequence[torch.Tensor] | None = None,
    *,
    guard: str = "auto",
    tokens: str | int | Sequence[int] = "1,512",
    cost: str = "builtin",
    **options,
) -> Allocation:
    """:func:`allocate` under the speed guard ``guard`` (see the module docstring).

    ``tokens``: tokens per call the factorised layers must not be slower at (1 = decode,
    512 = prefill); ``cost``: ``"builtin"``, ``"measure"`` or a cost-model data file.
    ``info`` records the mode, whether it was applied, how many matrices it limited and
    ``slower_than_dense``: factorised matrices above their speed limit (0 whenever applied).
    """
    from rankwise.evaluation.cost_model import parse_tokens, speed_max_ranks

    if guard not in SPEED_GUARDS:
        raise RankwiseError(f"speed_guard must be one of {', '.join(SPEED_GUARDS)}, got {guard!r}.")
    toks = parse_tokens(tokens)
    info = {"speed_guard": guard, "speed_tokens": ",".join(map(str, toks)), "speed_cost": str(cost)}
    limits = speed_max_ranks(shapes, toks, cost)
    if cost == "measure" and torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [limits]  # timings differ between processes: every process allocates with rank 0's limits
        torch.distributed.broadcast_object_list(box, src=0)
        limits = box[0]
    out: Allocation | None = None
    applied = False
    if guard != "off":
        try:
            out = allocate(name, shapes, ratio, energies, max_ranks=limits, **options)
            applied = True
        except RankwiseError as exc:
            if guard == "strict":
                raise
            out = allocate(name, shapes, ratio, energies, **options)  # its own error if unreachable anyway
            warnings.warn(f"speed guard not applied, some layers stay slower than dense: {exc}", UserWarning,
                          stacklevel=2)
    if out is None:
        out = allocate(name, shapes, ratio, energies, **options)
    caps = rank_limits(shapes, limits)
    out.info.update(info)
    out.info["speed_guard_applied"] = applied
    out.info.setdefault("limited", sum(c < f for c, f in zip(caps, rank_limits(shapes))))
    out.info["slower_than_dense"] = sum(r is not None and r > c for r, c in zip(out.ranks, caps))
    return out


__all__ = ["SPEED_GUARDS", "check_speed_guard", "guarded_allocate"]
