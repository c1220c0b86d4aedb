"""Low-rank training: GaLore-style optimisers and rank-shaping callbacks (docs/methods.md §5).

* :class:`GaLoreAdamW`: drop-in for ``galore_torch.GaLoreAdamW`` with
  ``projection="svd" | "randomized" | "dct"`` and ``fira=True``;
  :func:`galore_param_groups` builds its groups for a Hugging Face model; :class:`GaLoreFactory`
  lets a Hugging Face ``Trainer`` build it (``optimizer_cls_and_kwargs``); under FSDP2 it works on
  the row shards (:mod:`rankwise.train.sharded`).
* :class:`TRP`, :class:`Cuttlefish`: HF ``TrainerCallback``s (their state and Cuttlefish's switches survive
  Trainer checkpoints and resume).
* :func:`optimizer_state_bytes`: optimizer-state memory counted from the tensors.
* The loop ``rankwise train`` runs is the HF Trainer of :func:`rankwise.training.train` (the same as tune's);
  :func:`rankwise.cli.train_cmd.fit` feeds it a ``TrainRunConfig``'s data.
* :class:`TrainRunConfig`: the ``rankwise train`` run (CLI options come from it);
  :mod:`rankwise.train.config` ``OPTIMIZERS``, ``CALLBACKS``, ``PROJECTIONS``: the registries of names.
"""

from typing import TYPE_CHECKING, Any

# Imported on first use (PEP 562), so ``rankwise.train.config`` (and ``rankwise train --help``) loads no torch.
_WHERE = {
    "TRP": "callbacks", "Cuttlefish": "callbacks", "replace_in_optimizer": "callbacks",
    "GaLoreAdamW": "galore", "GaLoreFactory": "galore", "galore_param_groups": "galore",
    "StateMemory": "memory", "optimizer_state_bytes": "memory",
    "Projector": "projector", "dct_basis": "projector",
    "TrainRunConfig": "config",
}

if TYPE_CHECKING:
    from rankwise.train.callbacks import TRP, Cuttlefish, replace_in_optimizer
    from rankwise.train.config import TrainRunConfig
    from rankwise.train.galore import GaLoreAdamW, GaLoreFactory, galore_param_groups
    from rankwise.train.memory import StateMemory, optimizer_state_bytes
    from rankwise.train.projector import Projector, dct_basis


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'rankwise.train' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"rankwise.train.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "TRP",
    "Cuttlefish",
    "GaLoreAdamW",
    "GaLoreFactory",
    "Projector",
    "StateMemory",
    "TrainRunConfig",
    "dct_basis",
    "galore_param_groups",
    "optimizer_state_bytes",
    "replace_in_optimizer",
]
