"""The registry of factorised layer types a rankwise checkpoint may contain.

A checkpoint's layer map (``config.json`` → ``quantization_config.layers`` and
``rankwise.json`` → ``layers``) maps a module name to a *spec*: a dict with a
``"type"`` key naming an entry of :data:`LAYER_TYPES`, plus whatever that type
needs to rebuild the layer. A layer type is a class with

* ``classmethod from_spec(spec: dict, dtype, device) -> nn.Module``: an empty
  (uninitialised, ``device="meta"`` allowed) layer of the right shapes, whose
  state-dict keys are the ones the checkpoint stores;
* ``def spec(self) -> dict``: the spec that rebuilds it (``"type"`` included).

``"lowrank"`` → :class:`~rankwise.surgery.lowrank.LowRankLinear` is built in;
other engineers' modules register theirs (``LAYER_TYPES.register("quant", QuantLinear)``)
and add their module to :data:`LAYER_MODULES` so loading a checkpoint imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.registry import Registry
from rankwise.surgery.lowrank import LowRankLinear
from rankwise.surgery.select import SelectLinear

#: modules imported (once, on first lookup) so that they register their layer types
LAYER_MODULES: list[str] = ["rankwise.surgery.lowrank", "rankwise.quantization.layer", "rankwise.train.regimes.layers"]


def _load_layer_modules() -> None:
    for mod in LAYER_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:  # an optional layer type whose dependencies are missing: its lookup fails by name
            continue


LAYER_TYPES: Registry[type[nn.Module]] = Registry("layer type", loader=_load_layer_modules)
LAYER_TYPES.register("lowrank", LowRankLinear)
LAYER_TYPES.register("select", SelectLinear)  # MoDeGPT (compression/modegpt.py)


def layer_spec(module: nn.Module) -> dict[str, Any] | None:
    """The spec of a registered factorised layer, or None for any other module."""
    spec = getattr(module, "spec", None)
    kind = getattr(type(module), "layer_type", None)
    if callable(spec) and isinstance(kind, str) and kind in LAYER_TYPES.names():
        return spec()
    return None


def layer_map(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: spec} for every registered factorised layer in ``model`` (outermost only)."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in out):
            continue
        spec = layer_spec(mod)
        if spec is not None:
            out[name] = spec
    return out


def is_factorised(module: nn.Module) -> bool:
    """True for a module of a registered layer type."""
    kind = getattr(type(module), "layer_type", None)
    return isinstance(kind, str) and kind in LAYER_TYPES.names() and isinstance(module, LAYER_TYPES.get(kind))


def build_layer(
    name: str, spec: Any, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """An empty layer for ``spec`` (one-line error naming ``name`` for an unknown type or a bad spec)."""
    if not isinstance(spec, dict):
        raise RankwiseError(f"the layer map entry of {name!r} is {type(spec).__name__}, not a mapping; "
                            "the checkpoint metadata is corrupt.")
    kind = spec.get("type", "lowrank")
    if not isinstance(kind, str):
        raise RankwiseError(f"the layer map entry of {name!r} has type {kind!r}; the checkpoint metadata is corrupt.")
    cls = LAYER_TYPES.get(kind)
    return cls.from_spec({**spec, "name": name}, dtype=dtype, device=device)
