"""Get and replace submodules by their dotted name."""

from __future__ import annotations

from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``model.named_modules()``)."""
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace submodule ``name`` by ``new``; returns the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
