"""Adapter registry: method name → layer factory (aliases accepted: ``welore_lrc`` = ``welore-lrc``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from rankwise.errors import RankwiseError

_ALIASES = {"welore_lrc": "welore-lrc", "welore": "welore-lrc"}

METHODS: tuple[str, ...] = ("lora", "pissa", "svfit", "salt", "sorsa", "loldu", "welore-lrc", "heal")
"""Every adapter rankwise.tune offers."""

PEFT_EXPORTABLE: tuple[str, ...] = ("lora", "pissa")
"""Adapters that PEFT can represent exactly (as a LoRA on the original weights)."""

LOWRANK_METHODS: tuple[str, ...] = ("welore-lrc", "heal")
"""Adapters that act on the LowRankLinear layers of a compressed model."""


def canonical_method(name: str) -> str:
    """The canonical name of ``name``; a one-line error listing the methods when unknown."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        raise RankwiseError(f"unknown adapter method {name!r}; choose one of: {', '.join(METHODS)}.")
    return key


def layer_factory(method: str) -> Callable[..., nn.Module]:
    """The constructor ``(base, config, name, state=None) -> AdapterLayer`` of ``method``."""
    method = canonical_method(method)
    if method == "lora":
        from rankwise.tune.lora import LoRALayer as cls
    elif method == "pissa":
        from rankwise.tune.pissa import PiSSALayer as cls
    elif method == "svfit":
        from rankwise.tune.svfit import SVFitLayer as cls
    elif method == "salt":
        from rankwise.tune.salt import SALTLayer as cls
    elif method == "sorsa":
        from rankwise.tune.sorsa import SORSALayer as cls
    elif method == "loldu":
        from rankwise.tune.loldu import LoLDULayer as cls
    elif method == "welore-lrc":
        from rankwise.tune.welore_lrc import FactorLayer as cls
    else:
        from rankwise.tune.heal import heal_layer as cls
    return cls
