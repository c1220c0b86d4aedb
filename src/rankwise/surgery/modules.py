"""Get and replace submodules by their dotted name, and undo factorisation (the one place that swaps modules)."""

from __future__ import annotations

import copy

from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``model.named_modules()``)."""
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace submodule ``name`` by ``new``; returns the module that was there."""
    old = model.get_submodule(name)
    model.set_submodule(name, new, strict=True)
    return old


def to_dense(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every LowRankLinear by the dense B A (Linear or Conv1D, as it was) and every SelectLinear by its W'."""
    from rankwise.surgery.lowrank import LowRankLinear
    from rankwise.surgery.select import SelectLinear

    if not inplace:
        model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (LowRankLinear, SelectLinear)):
            set_module(model, name, mod.to_dense())
    return model
