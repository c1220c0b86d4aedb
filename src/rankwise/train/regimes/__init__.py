"""Training regimes: what the *weights* of the targeted matrices are while training (``rankwise train --regime``).

* ``dense``: the model as it is (every optimiser, every callback).
* ``sltrain`` (Han et al. 2024): every target W becomes s·B A + S, S on a fixed random support of
  density δ (``--sparse-density``), B, A and the values of S trained; fewer parameters from step 1.
* ``relora`` (Lialin et al. 2023): W frozen plus a LoRA s·B A; every ``--relora-every`` steps B A is
  merged into W, the factors restart, ``--relora-reset`` (99 %) of their Adam moments are pruned by
  magnitude and the learning rate follows a jagged cosine schedule with short warm restarts.
* ``lost`` (Li et al. 2025): W's SVD gives the low-rank part (top ``--rank`` directions) and, from the
  remaining spectrum, a channel-wise sparse part (the input channels where the residual is largest).

Each regime is a model transform (:meth:`Regime.prepare`) plus Trainer callbacks and, for ReLoRA, a
learning-rate schedule, so it plugs into the HF ``Trainer`` (``rankwise.training``) or a plain loop.
This module imports no torch: the CLI lists :data:`REGIMES` and :func:`check_combination` validates a
run before anything heavy is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rankwise.errors import RankwiseError
from rankwise.registry import Registry

if TYPE_CHECKING:
    from rankwise.train.regimes.base import Regime

_MODULES = {"dense": "base", "sltrain": "sltrain", "relora": "relora", "lost": "lost"}


def _load() -> None:
    for mod in sorted(set(_MODULES.values())):
        importlib.import_module(f"rankwise.train.regimes.{mod}")


#: name → Regime subclass (its module is imported on first lookup)
REGIMES: Registry[type[Regime]] = Registry("regime", loader=_load, builtin=tuple(_MODULES))

#: the optimisers each regime trains with. GaLore/Fira project the gradient of a *dense* matrix onto a rank-r
#: subspace; the other regimes already make the weights low rank (plus sparse), so AdamW trains their factors.
OPTIMIZERS_OF: dict[str, tuple[str, ...]] = {
    "dense": ("adamw", "galore", "galore-dct", "fira"),
    "sltrain": ("adamw",),
    "relora": ("adamw",),
    "lost": ("adamw",),
}


def check_combination(regime: str, optimizer: str, callback: str | None = None, fsdp: bool = False,
                      from_scratch: bool = True, sparse_density: float = 0.03) -> None:
    """One-line :class:`RankwiseError` when ``regime`` contradicts the other options (lists what combines)."""
    REGIMES.check(regime)
    if not 0.0 < sparse_density < 1.0:
        raise RankwiseError(f"--sparse-density must lie strictly between 0 and 1, got {sparse_density}.")
    if regime == "dense":
        return
    allowed = OPTIMIZERS_OF[regime]
    if optimizer not in allowed:
        table = "; ".join(f"{r}: {', '.join(o)}" for r, o in OPTIMIZERS_OF.items())
        raise RankwiseError(
            f"--regime {regime} trains low-rank factors, which --optimizer {optimizer} would project onto a rank-r "
            f"subspace again; use --optimizer {' or '.join(allowed)}. Combinations that exist: {table}."
        )
    if callback is not None:
        raise RankwiseError(
            f"--callback {callback} reshapes dense weight matrices, but --regime {regime} has replaced them; use "
            "--regime dense with --callback, or drop --callback."
        )
    if fsdp:
        raise RankwiseError(
            f"--regime {regime} is not supported with --fsdp (its layers are not sharded); run it in one process or "
            "under torchrun without --fsdp (DDP)."
        )
    if regime == "sltrain" and not from_scratch:
        raise RankwiseError(
            "--regime sltrain pre-trains from a random init and would discard the pretrained weights; add "
            "--from-scratch, or use --regime lost (starts from the SVD of the weights) or relora."
        )


def __getattr__(name: str) -> Any:
    lazy = {"Regime": "base", "build_regime": "base", "to_dense": "base", "export_dense": "base",
            "SparseLowRankLinear": "layers", "ReLoRALinear": "layers", "ReLoRACallback": "relora",
            "jagged_cosine_schedule": "relora", "SLTrain": "sltrain", "ReLoRA": "relora", "LOST": "lost",
            "Dense": "base"}
    if name not in lazy:
        raise AttributeError(f"module 'rankwise.train.regimes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rankwise.train.regimes.{lazy[name]}"), name)
    globals()[name] = value
    return value


__all__ = ["OPTIMIZERS_OF", "REGIMES", "check_combination"]
