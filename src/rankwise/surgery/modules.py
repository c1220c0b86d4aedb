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
    """Replace every layer of a registered layer type (outermost first) by the plain layer it computes.

    One conversion for every kind rankwise writes (low-rank, MoDeGPT selections, quantised, training
    regimes): each layer type gives its own ``to_dense()``; a quantised low-rank layer converts as a whole.
    """
    from rankwise.surgery.layers import is_factorised

    if not inplace:
        model = copy.deepcopy(model)
    done: list[str] = []
    for name, mod in list(model.named_modules()):
        if any(name.startswith(p + ".") for p in done):
            continue
        if is_factorised(mod) and callable(getattr(mod, "to_dense", None)):
            set_module(model, name, mod.to_dense())
            done.append(name)
    return model
